"""Edit metrics as each benchmark's authors compute them, batched and jit-compiled.

  l1, l2     mean |gen - gt| / (gen - gt)^2 over pixels and channels in [0, 1], the generated
             image resized (PIL bicubic) to the ground truth's size (MagicBrush's image_eval.py)
  ssim       Gaussian 11x11, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2 on [0, 1]; `standard` crops the
             filter radius (scikit-image, Wang et al.), `zero_pad` pads with zeros and averages
             everything (the pytorch-ssim code the GIER / MA5k authors use)
  lpips      AlexNet or VGG LPIPS v0.1 on [-1, 1] at the ground truth's size
  clip_i     cosine of CLIP image embeddings (generated vs ground truth); CLIP preprocessing
  clip_t     cosine of the generated image's CLIP embedding and the caption's
  clip_s_input, clip_s_goal   CLIP-S of the written expressive instruction: the cosine of its CLIP
             text embedding and the input's (goal image's) image embedding; only for editors that
             write one (MGIE, LGIE); the paper compares them across editors
  dino       cosine of DINO ViT-S/16 CLS features; resize 256 (shortest side), crop 224, ImageNet stats

Every metric is a small class: `prepare` turns PIL images (and the example) into fixed-size
arrays on the host, `score` maps a batch of them to one number per example on the device.
Raw values (cosines in [-1, 1]); papers often print x100.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from mgie_jax.convert import from_pretrained
from mgie_jax.convert.metric_models import lpips_from_files
from mgie_jax.core.images import clip_view
from mgie_jax.models.clip import ClipModel
from mgie_jax.models.vit import ViTModel

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# --- host preprocessing --------------------------------------------------------------------------

def unit(img: Image.Image, size=None) -> np.ndarray:
  """PIL -> float32 HWC in [0, 1], optionally resized (bicubic) to `size` = (width, height)."""
  img = img.convert("RGB")
  if size is not None and img.size != tuple(size):
    img = img.resize(tuple(size), Image.BICUBIC)
  return np.asarray(img, np.float32) / 255.0


def shortest_side_crop(img: Image.Image, resize: int, crop: int) -> Image.Image:
  """torchvision Resize(resize) (shortest side, bicubic) then CenterCrop(crop)."""
  img = img.convert("RGB")
  w, h = img.size
  nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
  img = img.resize((nw, nh), Image.BICUBIC)
  left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
  return img.crop((left, top, left + crop, top + crop))


def dino_view(img: Image.Image, resize: int = 256, crop: int = 224) -> np.ndarray:
  x = np.asarray(shortest_side_crop(img, resize, crop), np.float32) / 255.0
  return (x - IMAGENET_MEAN) / IMAGENET_STD


# --- device functions ----------------------------------------------------------------------------

@jax.jit
def l1(a, b):
  return jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))


@jax.jit
def l2(a, b):
  return jnp.mean((a - b) ** 2, axis=(1, 2, 3))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - size // 2
  g = np.exp(-x ** 2 / (2 * sigma ** 2))
  return (g / g.sum()).astype(np.float32)


def _blur(x, window, padding):
  """Separable Gaussian over H and W of NHWC `x`, written as a weighted sum of shifted slices:
  XLA fuses it into one loop, ~10x faster on CPU than a depthwise convolution."""
  k = len(window)
  r = k // 2
  if padding == "zero":
    x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
  h, w = x.shape[1] - 2 * r, x.shape[2] - 2 * r
  x = sum(float(window[i]) * x[:, i:i + h] for i in range(k))
  return sum(float(window[i]) * x[:, :, i:i + w] for i in range(k))


@functools.partial(jax.jit, static_argnames=("variant",))
def ssim(a, b, variant: str = "standard"):
  """a, b [B, H, W, C] in [0, 1] -> [B]. `standard`: valid filtering (= scikit-image's crop of the
  filter radius); `zero_pad`: zero "same" padding, mean over the whole map."""
  if variant not in ("standard", "zero_pad"):
    raise ValueError(f"ssim variant must be 'standard' or 'zero_pad', got {variant!r}")
  pad = "zero" if variant == "zero_pad" else "valid"
  win = gaussian_window()
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  mu_a, mu_b = _blur(a, win, pad), _blur(b, win, pad)
  var_a = _blur(a * a, win, pad) - mu_a ** 2
  var_b = _blur(b * b, win, pad) - mu_b ** 2
  cov = _blur(a * b, win, pad) - mu_a * mu_b
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def cosine(a, b):
  a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
  return jnp.sum(a * b, axis=-1)


# --- the metrics ---------------------------------------------------------------------------------

class Metric:
  """`prepare(gen, target, example) -> dict of numpy arrays` (host); `score(batch) -> [B]`.
  Examples whose prepared arrays share shapes are batched together (pixel metrics run at the
  ground truth's size). `example` holds "caption" and, for `needs_input` metrics, "input"."""
  name = ""
  needs_caption = False
  needs_input = False
  needs_expressive = False   # scored only for rows with a written expressive instruction (example["expressive"])
  lower_is_better = False

  def prepare(self, gen: Image.Image, target: Image.Image, example: dict) -> dict:
    raise NotImplementedError

  def score(self, batch: dict) -> np.ndarray:
    raise NotImplementedError


class PixelMetric(Metric):
  lower_is_better = True

  def __init__(self, name: str):
    self.name = name
    self.lower_is_better = name in ("l1", "l2")

  def prepare(self, gen, target, example):
    return {"gen": unit(gen, target.size), "target": unit(target)}

  def score(self, batch):
    a, b = jnp.asarray(batch["gen"]), jnp.asarray(batch["target"])
    if self.name == "l1":
      return np.asarray(l1(a, b))
    if self.name == "l2":
      return np.asarray(l2(a, b))
    return np.asarray(ssim(a, b, variant="zero_pad" if self.name == "ssim_zero_pad" else "standard"))


class LPIPSMetric(Metric):
  lower_is_better = True

  def __init__(self, model, name: str = "lpips"):
    self.model, self.name = model, name
    self._fn = nnx.jit(lambda m, a, b: m(a, b))

  def prepare(self, gen, target, example):
    return {"gen": unit(gen, target.size) * 2 - 1, "target": unit(target) * 2 - 1}

  def score(self, batch):
    return np.asarray(self._fn(self.model, jnp.asarray(batch["gen"]), jnp.asarray(batch["target"])))


class ClipImageMetric(Metric):
  name = "clip_i"

  def __init__(self, clip):
    self.clip = clip
    self.size = clip.vision_model.config.image_size
    self._fn = nnx.jit(lambda m, a, b: cosine(m.image_features(a).astype(jnp.float32),
                                              m.image_features(b).astype(jnp.float32)))

  def prepare(self, gen, target, example):
    return {"gen": clip_view(gen.convert("RGB"), self.size), "target": clip_view(target.convert("RGB"), self.size)}

  def score(self, batch):
    return np.asarray(self._fn(self.clip, jnp.asarray(batch["gen"]), jnp.asarray(batch["target"])))


class ClipTextMetric(Metric):
  name = "clip_t"
  needs_caption = True

  def __init__(self, clip, tokenizer, context: int = 77):
    self.clip, self.tokenizer, self.context = clip, tokenizer, context
    self.size = clip.vision_model.config.image_size
    self._fn = nnx.jit(lambda m, a, ids, mask: cosine(m.image_features(a).astype(jnp.float32),
                                                      m.text_features(ids, mask).astype(jnp.float32)))

  def pair(self, gen, target, example):
    """The (image, text) whose CLIP embeddings are compared."""
    return gen, example["caption"]

  def prepare(self, gen, target, example):
    image, text = self.pair(gen, target, example)
    enc = self.tokenizer(text, padding="max_length", truncation=True, max_length=self.context)
    return {"image": clip_view(image.convert("RGB"), self.size),
            "ids": np.asarray(enc["input_ids"], np.int32), "mask": np.asarray(enc["attention_mask"], np.int32)}

  def score(self, batch):
    return np.asarray(self._fn(self.clip, jnp.asarray(batch["image"]), jnp.asarray(batch["ids"]),
                               jnp.asarray(batch["mask"])))


class ClipScoreMetric(ClipTextMetric):
  """CLIP-S of the expressive instruction against the input ("clip_s_input") or goal image ("clip_s_goal")."""
  needs_caption = False
  needs_expressive = True

  def __init__(self, clip, tokenizer, name: str, context: int = 77):
    super().__init__(clip, tokenizer, context)
    self.name = name
    self.needs_input = name == "clip_s_input"

  def pair(self, gen, target, example):
    return (example["input"] if self.needs_input else target), example["expressive"]


class DinoMetric(Metric):
  name = "dino"

  def __init__(self, vit):
    self.vit = vit
    self._fn = nnx.jit(lambda m, a, b: cosine(m.cls_features(a).astype(jnp.float32),
                                              m.cls_features(b).astype(jnp.float32)))

  def prepare(self, gen, target, example):
    return {"gen": dino_view(gen), "target": dino_view(target)}

  def score(self, batch):
    return np.asarray(self._fn(self.vit, jnp.asarray(batch["gen"]), jnp.asarray(batch["target"])))


class PaletteMetric(Metric):
  """For images drawn from a known palette (the synthetic data): every pixel is mapped to its
  nearest palette colour. `edit_acc`: the share of the pixels the edit changes (input vs target)
  that the edit got right; `keep_acc`: the share of the others left right. Exact, CLIP-free."""
  needs_input = True

  def __init__(self, name: str, palette: dict):
    self.name = name
    self.palette = np.asarray(list(palette.values()), np.float32) / 255.0

  def _index(self, img, size):
    x = unit(img, size)
    return np.argmin(((x[..., None, :] - self.palette) ** 2).sum(-1), axis=-1).astype(np.int32)

  def prepare(self, gen, target, example):
    size = target.size
    t, i, g = self._index(target, None), self._index(example["input"], size), self._index(gen, size)
    return {"right": (g == t).astype(np.float32), "changed": (t != i).astype(np.float32)}

  def score(self, batch):
    right, changed = batch["right"], batch["changed"]
    region = changed if self.name == "edit_acc" else 1.0 - changed
    n = region.sum(axis=(1, 2))
    return np.where(n > 0, (right * region).sum(axis=(1, 2)) / np.maximum(n, 1), 1.0)


PIXEL = ("l1", "l2", "ssim", "ssim_zero_pad")
PALETTE = ("edit_acc", "keep_acc")
CLIP_S = ("clip_s_input", "clip_s_goal")
ALL = PIXEL + ("lpips", "lpips_vgg", "clip_i", "clip_t", "dino") + CLIP_S + PALETTE


def make_metrics(names, *, clip: str = "", lpips_alex: tuple = (), lpips_vgg: tuple = (), dino: str = "",
                 palette: dict | None = None, dtype=None) -> list[Metric]:
  """The named metrics, loading their models from local folders / files (never downloaded).
  `lpips_alex` / `lpips_vgg` are (backbone weights, lpips heads) file pairs."""
  out, clip_model = [], None
  for name in names:
    if name in PIXEL:
      out.append(PixelMetric(name))
    elif name in PALETTE:
      if not palette:
        raise ValueError(f"metric {name} needs the images' palette (synthetic data only)")
      out.append(PaletteMetric(name, palette))
    elif name in ("lpips", "lpips_vgg"):
      files = lpips_alex if name == "lpips" else lpips_vgg
      if len(files) != 2:
        raise ValueError(f"metric {name} needs its backbone and head weight files")
      out.append(LPIPSMetric(lpips_from_files(*files, net="alex" if name == "lpips" else "vgg", dtype=dtype), name))
    elif name in ("clip_i", "clip_t") + CLIP_S:
      if not clip:
        raise ValueError(f"metric {name} needs a local CLIPModel folder")
      if clip_model is None:
        clip_model = from_pretrained(ClipModel, clip, dtype)
      if name == "clip_i":
        out.append(ClipImageMetric(clip_model))
      else:
        import transformers
        tokenizer = transformers.CLIPTokenizer.from_pretrained(clip)
        out.append(ClipTextMetric(clip_model, tokenizer) if name == "clip_t" else ClipScoreMetric(clip_model, tokenizer, name))
    elif name == "dino":
      if not dino:
        raise ValueError("metric dino needs a local ViT (DINO) folder")
      out.append(DinoMetric(from_pretrained(ViTModel, dino, dtype)))
    else:
      raise ValueError(f"unknown metric {name!r}; known: {', '.join(ALL)}")
  return out
