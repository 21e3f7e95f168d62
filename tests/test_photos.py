"""Editing photos at their own size and shape: shape buckets, one compile per bucket, the square
crop as before, keep-unchanged pixels (tiny random-weight MGIE)."""

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import tiny
from mgie_jax.diffusion import guidance
from mgie_jax.inference import greedy, photos
from mgie_jax.inference import pipeline as inference
from mgie_jax.inference.shapes import ASPECTS, bucket_for, bucket_set, stride
from mgie_jax.models.mgie import MGIE
from mgie_jax.run import model as build_lib
from mgie_jax.text import LlamaTokenizer, prompt_text

STEPS = 2


@pytest.fixture(scope="module")
def mgie(run_data):
  c = tiny.get_config()
  tok = LlamaTokenizer.from_pretrained(run_data[1])
  return MGIE(build_lib.random_config(c, tok), rngs=nnx.Rngs(0)), tok


def photo(w, h, seed=0):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)      # smooth, so resizing means something
  return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def test_buckets_are_stride_multiples_with_the_long_side_at_the_resolution():
  assert stride(_sd_like()) == 64
  shapes = bucket_set(512, 64)
  assert len(shapes) <= 2 * len(ASPECTS) - 1 and (512, 512) in shapes
  for w, h in shapes:
    assert w % 64 == 0 and h % 64 == 0 and max(w, h) == 512
  assert bucket_for((640, 360), 512, 64) == (512, 320)        # 16:9 -> 512 x 288 rounded to 64
  assert bucket_for((300, 900), 512, 64) == (192, 512)        # 1:3, portrait
  assert bucket_for((4000, 3000), 512, 64) == (512, 384)      # 4:3 exactly
  assert bucket_for((500, 500), 32, 4) == (32, 32)
  with pytest.raises(ValueError, match="multiple"):
    bucket_for((10, 10), 500, 64)


def _sd_like():
  class Tower:
    def __init__(self, n):
      self.block_out_channels = (1,) * n
  class Config:
    vae, unet = Tower(4), Tower(4)      # Stable Diffusion: 3 VAE and 3 UNet downsamplings
  return Config()


@pytest.mark.slow
def test_photos_come_back_at_their_own_size_and_compile_only_the_bucket_set(mgie):
  model, tok = mgie
  m = stride(model.config)
  sizes = [(640, 360), (300, 900), (64, 48), (100, 100), (1000, 560), (90, 300), (333, 500), (50, 60)]
  before = guidance._edit._cache_size()
  for k, (w, h) in enumerate(sizes):
    out, texts = photos.edit_photos(model, tok, [photo(w, h, k)], ["make it blue"], seeds=[k], resolution=32,
                                    steps=STEPS, max_new_tokens=4)
    assert out[0].shape == (h, w, 3) and out[0].dtype == np.uint8 and len(texts) == 1
  buckets = {bucket_for(s, 32, m) for s in sizes}
  assert buckets <= set(bucket_set(32, m))
  assert guidance._edit._cache_size() - before == len(buckets)          # one program per bucket
  generate = greedy._generate._cache_size()
  n_img = model.config.llava.num_image_tokens
  length = lambda i: len(tok.encode(prompt_text(i, n_img)))
  block = lambda n: -(-n // photos.TEXT_MULTIPLE)
  other = next(i for i in ("make it red", "turn it red", "make it green", "paint it red", "add a circle",
                           "remove it", "make it blue now", "make it a bit blue", "blue", "go blue", "make blue", "red")
               if length(i) != length("make it blue") and block(length(i)) == block(length("make it blue")))
  photos.edit_photos(model, tok, [photo(641, 359, 9)], [other], seeds=[3],
                     resolution=32, steps=STEPS, max_new_tokens=4)     # a seen bucket, another prompt length
  assert guidance._edit._cache_size() - before == len(buckets)
  assert greedy._generate._cache_size() == generate                    # prompt lengths padded to 16


def test_square_crop_is_the_edit_as_before_bit_for_bit(mgie):
  model, tok = mgie
  images = [photo(640, 360, 1)]
  want, want_texts = inference.edit(model, tok, images, ["make it blue"], key=jax.random.key(5), resolution=32,
                                    steps=STEPS, max_new_tokens=4)
  got, texts = photos.edit_photos(model, tok, images, ["make it blue"], seeds=[5], resolution=32, crop="square",
                                  steps=STEPS, max_new_tokens=4)
  assert texts == want_texts
  np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.slow
def test_rows_do_not_depend_on_their_batch(mgie):
  model, tok = mgie
  images = [photo(640, 360, 2), photo(64, 36, 3)]                    # one bucket
  both, texts = photos.edit_photos(model, tok, images, ["make it blue", "add a circle"], seeds=[7, 8],
                                   resolution=32, steps=STEPS, max_new_tokens=4)
  alone, text = photos.edit_photos(model, tok, images[1:], ["add a circle"], seeds=[8], resolution=32,
                                   steps=STEPS, max_new_tokens=4)
  assert text[0] == texts[1]
  # The same noise; a batch of 2 and one of 1 round differently in float32 (at most a level).
  assert np.abs(both[1].astype(int) - alone[0]).max() <= 2


def test_keep_unchanged_keeps_the_photos_own_pixels_outside_the_mask(mgie):
  model, _ = mgie
  image = photo(200, 120, 4)
  shape = bucket_for(image.size, 32, stride(model.config))
  pixels = photos.pixels_for(image, shape)
  recon = np.asarray(photos.reconstruct(model.vae, jax.numpy.asarray(pixels[None])))[0]
  edited = recon.copy()
  edited[4:10, 12:20] = 1.0 - edited[4:10, 12:20]                      # the edit changed one patch
  out, mask = photos.finish(image, edited, recon, pixels, "none")
  src = np.asarray(image)
  assert out.shape == src.shape and mask.shape == src.shape[:2]
  assert (mask == 0).mean() > 0.3 and (mask == 1).any()
  np.testing.assert_array_equal(out[mask == 0], src[mask == 0])         # exactly the input's pixels
  changed = np.asarray(Image.fromarray(np.round(edited * 255).astype(np.uint8)).resize(image.size, Image.BICUBIC))
  np.testing.assert_array_equal(out[mask == 1], changed[mask == 1])
  # An edit that changed nothing keeps the whole photo.
  same, none = photos.finish(image, recon, recon, pixels, "none")
  assert not none.any()
  np.testing.assert_array_equal(same, src)
  # End to end, the option is honoured at the photo's size.
  outs, _ = photos.edit_photos(model, mgie[1], [image], ["make it blue"], seeds=[0], resolution=32, steps=STEPS,
                               keep_unchanged=True, max_new_tokens=4)
  assert outs[0].shape == src.shape
