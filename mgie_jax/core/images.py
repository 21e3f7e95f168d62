"""Image decoding, checks and MGIE's preprocessing, with PIL (shared by data building, the
loader, inference and evaluation).

Building keeps the original encoded bytes; `check_image` only decides whether they are
usable. Any mode PIL decodes (palette, gray, gray+alpha, RGBA, CMYK, 16-bit) is converted with
`.convert("RGB")`, as the reference pipelines do; only undecodable images are refused.
MGIE's preprocessing: center-crop to a square, resize to 512, then bicubic to the training size
in [-1, 1]; the CLIP view is the 512 image resized (shortest side, bicubic) and center-cropped
to 224, normalised with CLIP's mean/std.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
MAX_PIXELS = 8192 * 8192          # larger images are skipped, never decoded
MIN_SIDE = 8


class BadImage(ValueError):
  """An unusable image; `reason` is the key it is counted under."""

  def __init__(self, reason: str, detail: str = ""):
    self.reason = reason
    super().__init__(f"{reason}: {detail}" if detail else reason)


def check_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[tuple[int, int], str]:
  """Raise BadImage unless `data` decodes completely; returns ((width, height), PIL mode).

  A mode other than RGB is fine (it is converted when decoded); the caller may count it."""
  if not data:
    raise BadImage("empty_image")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      size = img.size
      mode = img.mode
  except (Image.DecompressionBombError, Image.DecompressionBombWarning):
    raise BadImage("too_large") from None
  except Exception as e:  # PIL raises many types for garbage bytes
    detail = "not an image format PIL knows" if "cannot identify" in str(e) else str(e)
    raise BadImage("unreadable_image", detail) from None
  if size[0] * size[1] > max_pixels:
    raise BadImage("too_large", f"{size[0]}x{size[1]}")
  if min(size) < MIN_SIDE:
    raise BadImage("too_small", f"{size[0]}x{size[1]}")
  try:
    img.load()              # decodes fully: catches truncated files
    if mode != "RGB":
      img.convert("RGB")
  except Exception as e:
    raise BadImage("truncated_image", str(e)) from None
  return size, mode


def decode_rgb(data: bytes) -> Image.Image:
  """Encoded bytes -> an RGB PIL image (any decodable mode converted)."""
  img = Image.open(io.BytesIO(data))
  img.load()
  return img if img.mode == "RGB" else img.convert("RGB")


def open_rgb(path, max_pixels: int = MAX_PIXELS) -> Image.Image:
  """A user's photo file -> RGB PIL image as a viewer shows it; raises BadImage when it cannot be
  decoded (or is over `max_pixels`)."""
  with open(path, "rb") as f:
    data = f.read()
  check_image(data, max_pixels)
  return photo_rgb(Image.open(io.BytesIO(data)))


def photo_rgb(img: Image.Image) -> Image.Image:
  """RGB as a viewer shows the photo: EXIF rotation applied, 16-bit and 32-bit gray scaled to 8 bits
  (PIL's convert clips them), transparency over white. Datasets keep `decode_rgb`'s plain convert,
  as the reference pipelines do."""
  img = ImageOps.exif_transpose(img)
  if img.mode.startswith("I;16") or img.mode == "I":
    peak = 65535.0 if img.mode.startswith("I;16") or np.asarray(img).max() > 255 else 255.0
    img = Image.fromarray(np.round(np.asarray(img, np.float64) * (255.0 / peak)).clip(0, 255).astype(np.uint8))
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img if img.mode == "RGB" else img.convert("RGB")


def center_crop_square(img: Image.Image) -> Image.Image:
  w, h = img.size
  s = min(w, h)
  left, top = (w - s) // 2, (h - s) // 2
  return img.crop((left, top, left + s, top + s))


def mgie_square(img: Image.Image, size: int = 512) -> Image.Image:
  """MGIE's first step for every image: center-crop to a square, resize to 512 (bicubic)."""
  return center_crop_square(img).resize((size, size), Image.BICUBIC)


def to_model_range(img: Image.Image, size: int) -> np.ndarray:
  """Bicubic to size x size, float32 HWC in [-1, 1]."""
  if img.size != (size, size):
    img = img.resize((size, size), Image.BICUBIC)
  return np.asarray(img, np.float32) / 127.5 - 1.0


def clip_view(img: Image.Image, size: int = 224) -> np.ndarray:
  """CLIPImageProcessor: shortest side to `size` (bicubic), center crop, /255, CLIP mean/std."""
  w, h = img.size
  if w <= h:
    nw, nh = size, int(size * h / w)
  else:
    nw, nh = int(size * w / h), size
  img = img.resize((nw, nh), Image.BICUBIC)
  left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
  img = img.crop((left, top, left + size, top + size))
  return (np.asarray(img, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
