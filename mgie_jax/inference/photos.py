"""Photo in, photo out: MGIE edits at the photo's own aspect ratio, returned at its own size.

The MLLM always sees MGIE's CLIP view (centre square, as it was trained). The diffusion model edits
the whole photo resized to its shape bucket (`mgie_jax.inference.shapes`), and the edit is resized
back to the photo's size. `crop="square"` is MGIE's own preprocessing instead (centre square at
the resolution, returned at that size), the protocol of the square benchmarks.

With `keep_unchanged`, the photo's own pixels are kept wherever the edit did not change the image:
the edit is compared with the VAE's reconstruction of the input (not with the input itself, so
the VAE's own blur does not count as a change), the difference is smoothed, thresholded at
max(`MASK_FLOOR`, Otsu's threshold) (Otsu splits a changed-vs-unchanged histogram; the floor keeps
an edit that changed nothing from turning reconstruction noise into a mask), grown and feathered,
and scaled to the photo's size. Where the mask is 0 the output is the input, pixel for pixel.

Each row draws its noise from its own key, so a row's edit does not depend on the batch it is in.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

from mgie_jax.core.images import clip_view, mgie_square, to_model_range
from mgie_jax.diffusion import edit_images, make_sampler
from mgie_jax.diffusion import guidance
from mgie_jax.diffusion.guidance import draw_noise
from mgie_jax.inference import pipeline
from mgie_jax.inference.shapes import bucket_for, stride

CROPS = ("none", "square")
MASK_FLOOR = 0.04        # mean |edit - reconstruction| over RGB in [0, 1] below which nothing changed
TEXT_MULTIPLE = 16       # prompt lengths are padded to a multiple of this: one MLLM compile per bucket


def edit_shape(model, image: Image.Image, resolution: int, crop: str = "none") -> tuple[int, int]:
  """(width, height) the diffusion model edits `image` at."""
  if crop == "square":
    return resolution, resolution
  return bucket_for(image.size, resolution, stride(model.config))


def pixels_for(image: Image.Image, shape: tuple[int, int], crop: str = "none") -> np.ndarray:
  """The UNet's view of `image`: float32 HWC in [-1, 1] at `shape` = (width, height)."""
  if crop == "square":
    return to_model_range(mgie_square(image), shape[0])
  return np.asarray(image.resize(shape, Image.BICUBIC), np.float32) / 127.5 - 1.0


def row_keys(seeds) -> list:
  return [jax.random.key(int(s)) for s in seeds]


def edit_photos(model, tok, images, instructions, *, seeds, resolution: int, crop: str = "none",
                keep_unchanged: bool = False, steps: int = 100, text_scale: float = 7.5,
                image_scale: float = 1.5, sampler=None, max_new_tokens: int = 96, on_step=None):
  """Edit RGB PIL `images` by `instructions`, row i sampled from `seeds[i]`.

  Returns (list of uint8 HxWx3 edits: each photo's own size, or resolution x resolution with
  crop="square"; the expressive instructions). Rows of different shape buckets are diffused
  separately (one compile per bucket and batch size). `on_step(done, total)`, if given, is
  called after each denoising step."""
  if crop not in CROPS:
    raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
  clip = np.stack([clip_view(mgie_square(im), model.config.clip_size) for im in images])
  # The square crop is MGIE's preprocessing as training samples it: prompts unpadded, exactly as there.
  texts, cond, null = pipeline.conditions(model, tok, clip, instructions, max_new_tokens=max_new_tokens,
                                          length_multiple=1 if crop == "square" else TEXT_MULTIPLE)
  sampler = make_sampler(sampler or pipeline.default_sampler(model), steps)
  keys = row_keys(seeds)
  shapes = [edit_shape(model, im, resolution, crop) for im in images]
  out = [None] * len(images)
  for shape in dict.fromkeys(shapes):
    rows = [i for i, s in enumerate(shapes) if s == shape]
    pixels = np.stack([pixels_for(images[i], shape, crop) for i in rows])
    latents, noise = _row_noise(model.vae, sampler, [keys[i] for i in rows], shape)
    with guidance.on_step(on_step) if on_step else contextlib.nullcontext():
      edited = np.asarray(edit_images(model.unet, model.vae, sampler, jnp.asarray(pixels), cond[np.asarray(rows)],
                                      null[np.asarray(rows)], latents=latents, noise=noise, text_scale=text_scale,
                                      image_scale=image_scale, report_steps=on_step is not None))
    recon = np.asarray(reconstruct(model.vae, jnp.asarray(pixels))) if keep_unchanged else None
    for k, i in enumerate(rows):
      out[i] = finish(images[i], edited[k], None if recon is None else recon[k], pixels[k], crop)[0]
  return out, texts


def _row_noise(vae, sampler, keys, shape):
  """Initial latents and per-step noise, each row from its own key (as a batch of one draws them)."""
  factor = 2 ** (len(vae.config.block_out_channels) - 1)
  one = (1, shape[1] // factor, shape[0] // factor, vae.config.latent_channels)
  drawn = [draw_noise(k, sampler, one) for k in keys]
  latents = jnp.concatenate([d[0] for d in drawn], axis=0)
  noise = jnp.concatenate([d[1] for d in drawn], axis=1) if sampler.needs_noise else None
  return latents, noise


def finish(image, edited, recon, pixels, crop):
  """One row's edit ([0, 1] at the bucket shape) as the uint8 photo to return, and the mask it
  was kept to (None without `recon`, the VAE reconstruction of `pixels`)."""
  edit_u8 = np.asarray(np.round(edited * 255)).astype(np.uint8)
  if crop == "square":
    base = np.asarray(np.round((pixels + 1) * 127.5)).astype(np.uint8)     # the square the model saw
    size = edit_u8.shape[1], edit_u8.shape[0]
  else:
    base = np.asarray(image)
    size = image.size
    edit_u8 = np.asarray(Image.fromarray(edit_u8).resize(size, Image.BICUBIC))
  if recon is None:
    return edit_u8, None
  mask = changed_mask(edited, recon)
  if mask.shape[::-1] != size:
    mask = np.clip(np.asarray(Image.fromarray(mask).resize(size, Image.BILINEAR)), 0.0, 1.0)
  return composite(base, edit_u8, mask), mask


def changed_mask(edited: np.ndarray, reconstructed: np.ndarray, floor: float = MASK_FLOOR) -> np.ndarray:
  """float32 [h, w] in [0, 1]: 1 where the edit changed the image, feathered to 0 around it (exact
  zeros beyond the feather). `edited`, `reconstructed`: HWC in [0, 1] at the same shape."""
  diff = np.abs(edited.astype(np.float32) - reconstructed.astype(np.float32)).mean(-1)
  side = max(diff.shape)
  diff = ndimage.gaussian_filter(diff, sigma=max(0.5, side / 256))
  threshold = max(floor, float(threshold_otsu(diff))) if diff.max() > diff.min() else floor
  changed = ndimage.binary_dilation(diff > threshold, iterations=max(1, side // 128))
  soft = ndimage.gaussian_filter(changed.astype(np.float32), sigma=max(1.0, side / 64), truncate=2.0)
  soft[soft < 1e-3] = 0.0
  return np.clip(soft, 0.0, 1.0)


def composite(photo: np.ndarray, edit: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """photo where mask is 0, the edit where it is 1, blended between (all uint8 HWC, mask [h, w])."""
  p = photo.astype(np.float32)
  out = p + mask[..., None].astype(np.float32) * (edit.astype(np.float32) - p)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


@nnx.jit
def reconstruct(vae, images):
  """The VAE's round trip of NHWC images in [-1, 1] (posterior mode), in [0, 1]."""
  decoded = vae.decode(vae.encode(images).mode())
  return jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
