"""Evaluation metrics vs their reference implementations, on real photographs with distortions:
transformers CLIPModel (image and text embeddings) and ViTModel (DINO), a PyTorch LPIPS written
as the `lpips` package computes it (random backbone and head weights), scikit-image SSIM, the
pytorch-ssim zero-padded SSIM, and MagicBrush's L1/L2. Tolerance: 1e-4 (fp32)."""

import io

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageFilter
from skimage import data as skdata
from skimage.metrics import structural_similarity

from conftest import max_err, tol
from mgie_jax.evaluation import metrics as M
from mgie_jax.models.clip import ClipModel
from mgie_jax.models.vit import ViTModel
from mgie_jax.convert import from_pretrained


def distortions(img: Image.Image):
  """(name, distorted) pairs of a photograph: noise, blur, JPEG, a colour shift, a resize."""
  rng = np.random.default_rng(0)
  a = np.asarray(img, np.float32)
  noisy = Image.fromarray(np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8))
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=15)
  shifted = Image.fromarray(np.clip(a * [1.1, 0.9, 1.0] + 12, 0, 255).astype(np.uint8))
  small = img.resize((img.width // 2 + 3, img.height // 2 + 1), Image.BILINEAR)
  return [("noise", noisy), ("blur", img.filter(ImageFilter.GaussianBlur(3))),
          ("jpeg", Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), ("color", shifted), ("resized", small)]


@pytest.fixture(scope="module")
def photos():
  out = []
  for fn in (skdata.astronaut, skdata.coffee, skdata.chelsea):
    img = Image.fromarray(fn()).convert("RGB")
    out += [(img, d) for _, d in distortions(img)]
  return out


# --- pixel metrics -------------------------------------------------------------------------------

def test_l1_l2_as_magicbrush_computes_them(photos):
  for target, gen in photos:
    ref_gen = torch.as_tensor(np.asarray(gen.resize(target.size), np.float32) / 255)   # PIL default: bicubic
    ref_gt = torch.as_tensor(np.asarray(target, np.float32) / 255)
    want1 = float(torch.nn.L1Loss()(ref_gen, ref_gt))
    want2 = float(torch.nn.MSELoss()(ref_gen, ref_gt))
    for name, want in (("l1", want1), ("l2", want2)):
      metric = M.PixelMetric(name)
      prep = metric.prepare(gen, target, {})
      got = metric.score({k: v[None] for k, v in prep.items()})[0]
      assert abs(got - want) <= 1e-4 * max(1, abs(want)), (name, got, want)


def test_ssim_standard_matches_scikit_image(photos):
  for target, gen in photos:
    a = np.asarray(target, np.float64) / 255
    b = np.asarray(gen.resize(target.size, Image.BICUBIC), np.float64) / 255
    want = structural_similarity(b, a, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, channel_axis=-1)
    got = float(M.ssim(b[None].astype(np.float32), a[None].astype(np.float32))[0])
    assert abs(got - want) <= 1e-4, (got, want)


def pytorch_ssim(a, b):
  """The zero-padded SSIM of the pytorch-ssim code (GIER / MA5k authors): NCHW in [0, 1]."""
  g = torch.as_tensor(M.gaussian_window(), dtype=torch.float64)
  w = (g[:, None] @ g[None, :]).expand(3, 1, 11, 11).contiguous()
  conv = lambda x: torch.nn.functional.conv2d(x, w, padding=5, groups=3)
  mu1, mu2 = conv(a), conv(b)
  s1, s2, s12 = conv(a * a) - mu1 ** 2, conv(b * b) - mu2 ** 2, conv(a * b) - mu1 * mu2
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))
  return float(m.mean())


def check_zero_padded_ssim(photos, crop=None):
  for target, gen in photos:
    a = np.asarray(target, np.float32) / 255
    b = np.asarray(gen.resize(target.size, Image.BICUBIC), np.float32) / 255
    if crop:   # the padded border is what this variant is about: a corner keeps two of its edges
      a, b = a[:crop, :crop], b[:crop, :crop]
    nchw = lambda x: torch.as_tensor(x.transpose(2, 0, 1)[None], dtype=torch.float64)
    want = pytorch_ssim(nchw(b), nchw(a))
    got = float(M.ssim(b[None], a[None], variant="zero_pad")[0])
    assert abs(got - want) <= 1e-4, (got, want)


def test_ssim_zero_padded_matches_pytorch_ssim_on_corners(photos):
  check_zero_padded_ssim(photos, crop=64)


@pytest.mark.slow
def test_ssim_zero_padded_matches_pytorch_ssim(photos):
  check_zero_padded_ssim(photos)
  # The two variants differ: the choice matters and is explicit.
  a = np.asarray(photos[0][0], np.float32)[None] / 255
  b = np.asarray(photos[0][1].resize(photos[0][0].size), np.float32)[None] / 255
  assert abs(float(M.ssim(a, b)[0]) - float(M.ssim(a, b, variant="zero_pad")[0])) > 1e-3


# --- LPIPS ---------------------------------------------------------------------------------------

def torch_features(net: str):
  """torchvision's AlexNet / VGG16 `features` stack, written out (random weights)."""
  from mgie_jax.models.lpips import NETS
  layers, taps = [], []
  for op in NETS[net]:
    if op[0] == "conv":
      while len(layers) < op[1]:
        layers.append(torch.nn.Identity())
      layers.append(torch.nn.Conv2d(op[2], op[3], op[4], stride=op[5], padding=op[6]))
    elif op[0] == "relu":
      layers.append(torch.nn.ReLU())
    elif op[0] == "pool":
      layers.append(torch.nn.MaxPool2d(op[1], op[2]))
    else:
      taps.append(len(layers) - 1)
  return torch.nn.Sequential(*layers), taps


def torch_lpips(features, taps, heads, a, b):
  """lpips.LPIPS(net=..., version='0.1') forward: scaling layer, unit-normalised features,
  squared differences, 1x1 linear heads, spatial mean, sum over layers."""
  shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
  scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

  def feats(x):
    x, out = (x - shift) / scale, []
    for i, layer in enumerate(features):
      x = layer(x)
      if i in taps:
        out.append(x)
    return out
  total = 0
  for fa, fb, w in zip(feats(a), feats(b), heads):
    norm = lambda f: f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)
    d = (norm(fa) - norm(fb)) ** 2
    total = total + torch.nn.functional.conv2d(d, w).mean(dim=(2, 3), keepdim=True)
  return total.flatten()


@pytest.mark.parametrize("net,size", [("alex", 256), ("vgg", 96)])
def test_lpips_matches_the_lpips_computation(net, size, photos, tmp_path):
  torch.manual_seed(1)
  features, taps = torch_features(net)
  for p in features.parameters():
    torch.nn.init.normal_(p, 0, 0.05)
  channels = [features[i - 1].out_channels for i in taps]
  heads = [torch.rand(1, c, 1, 1) for c in channels]
  sd = {f"features.{k}": v for k, v in features.state_dict().items()}
  sd["classifier.1.weight"] = torch.zeros(4, 4)           # torchvision files carry the classifier too
  torch.save(sd, tmp_path / "backbone.pth")
  torch.save({f"lin{k}.model.1.weight": h for k, h in enumerate(heads)}, tmp_path / "heads.pth")
  name = "lpips" if net == "alex" else "lpips_vgg"
  files = (str(tmp_path / "backbone.pth"), str(tmp_path / "heads.pth"))
  (metric,) = M.make_metrics([name], **{"lpips_alex" if net == "alex" else "lpips_vgg": files})
  pairs = [(t.resize((size, size)), g) for t, g in photos[::2]]
  prep = [metric.prepare(g, t, {}) for t, g in pairs]
  got = metric.score({k: np.stack([p[k] for p in prep]) for k in prep[0]})
  nchw = lambda x: torch.as_tensor(np.stack(x).transpose(0, 3, 1, 2))
  with torch.no_grad():
    want = torch_lpips(features.eval(), taps, heads, nchw([p["gen"] for p in prep]),
                       nchw([p["target"] for p in prep])).numpy()
  assert max_err(got, want) <= tol(want), (got, want)
  assert np.ptp(want) > 1e-3                       # distinct distortions, distinct distances


# --- CLIP and DINO -------------------------------------------------------------------------------

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)


def clip_folder(path, eos_token_id):
  torch.manual_seed(2)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id,
                       bos_token_id=97, pad_token_id=1),
      vision_config=TINY_VISION, projection_dim=24)
  model = transformers.CLIPModel(cfg).eval()
  model.save_pretrained(path)
  return model


@pytest.mark.parametrize("eos", [2, 98])
def test_clip_image_and_text_embeddings_match_transformers(eos, photos, tmp_path):
  ref = clip_folder(tmp_path, eos)
  ours = from_pretrained(ClipModel, str(tmp_path))
  pixels = np.stack([M.clip_view(g, 32) for _, g in photos[:6]])
  with torch.no_grad():
    want = ref.get_image_features(pixel_values=torch.as_tensor(pixels.transpose(0, 3, 1, 2)))
    want = getattr(want, "pooler_output", want).numpy()
  got = np.asarray(ours.image_features(pixels))
  assert max_err(got, want) <= tol(want)
  rng = np.random.default_rng(3)
  ids = np.ones((3, 16), np.int64)
  mask = np.zeros((3, 16), np.int64)
  for i, n in enumerate((5, 9, 16)):        # padded rows of different lengths, the end token last
    ids[i, :n] = np.r_[97, rng.integers(3, 90, n - 2), 98]
    mask[i, :n] = 1
  with torch.no_grad():
    want = ref.get_text_features(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    want = getattr(want, "pooler_output", want).numpy()
  got = np.asarray(ours.text_features(ids, mask))
  assert max_err(got, want) <= tol(want)


class _Ids:
  """A stand-in CLIP tokenizer: fixed ids per text (the metric's tokenisation is transformers' own)."""

  def __call__(self, text, padding, truncation, max_length):
    ids = [97] + [3 + (ord(ch) % 80) for ch in text][:max_length - 2] + [98]
    return {"input_ids": ids + [1] * (max_length - len(ids)), "attention_mask": [1] * len(ids) + [0] * (max_length - len(ids))}


def test_clip_s_of_the_expressive_instructions_matches_transformers(photos, tmp_path):
  """CLIP-S (input and goal) equals transformers' CLIPModel cosine on the same text/image pairs,
  and rows without a written instruction (copy-input, text-only editors) get none."""
  from mgie_jax.evaluation.sweep import score
  ref = clip_folder(tmp_path, 98)
  ours = from_pretrained(ClipModel, str(tmp_path))
  metrics = [M.ClipScoreMetric(ours, _Ids(), "clip_s_input", context=16),
             M.ClipScoreMetric(ours, _Ids(), "clip_s_goal", context=16)]
  inputs, goals = [p for p, _ in photos[:3]], [g for _, g in photos[:3]]
  texts = ["Paint the sky blue.", None, "Make the cake look healthier, add fruit."]

  class Ex:
    def __init__(self, image):
      buf = io.BytesIO()
      image.save(buf, "PNG")
      self.input_image, self.caption = buf.getvalue(), ""
  got = score(metrics, goals, goals, [Ex(i) for i in inputs], texts)
  assert "clip_s_input" not in got[1] and "clip_s_goal" not in got[1]
  for n in (0, 2):
    enc = _Ids()(texts[n], True, True, 16)
    with torch.no_grad():
      t = ref.get_text_features(input_ids=torch.as_tensor([enc["input_ids"]]),
                                attention_mask=torch.as_tensor([enc["attention_mask"]]))
      t = getattr(t, "pooler_output", t)
      for name, image in (("clip_s_input", inputs[n]), ("clip_s_goal", goals[n])):
        px = torch.as_tensor(M.clip_view(image.convert("RGB"), 32).transpose(2, 0, 1)[None].copy())
        v = ref.get_image_features(pixel_values=px)
        v = getattr(v, "pooler_output", v)
        want = float(torch.nn.functional.cosine_similarity(v, t).item())
        assert abs(got[n][name] - want) <= 1e-4, (name, got[n][name], want)


def test_dino_cls_features_match_transformers_vit(photos, tmp_path):
  torch.manual_seed(4)
  ref = transformers.ViTModel(transformers.ViTConfig(**TINY_VISION, hidden_act="gelu",
                                                      layer_norm_eps=1e-6), add_pooling_layer=False).eval()
  ref.save_pretrained(tmp_path)
  ours = from_pretrained(ViTModel, str(tmp_path))
  pixels = np.stack([M.dino_view(g, 36, 32) for _, g in photos[:6]])
  with torch.no_grad():
    want = ref(pixel_values=torch.as_tensor(pixels.transpose(0, 3, 1, 2))).last_hidden_state[:, 0].numpy()
  got = np.asarray(ours.cls_features(pixels))
  assert max_err(got, want) <= tol(want)
