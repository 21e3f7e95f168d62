"""Shape buckets for editing at the photo's own aspect ratio.

The VAE halves the image once per encoder block after the first, and the UNet halves the latents
once per down block after the first, so both image sides must be multiples of
`vae stride x unet stride` (Stable Diffusion: 8 x 8 = 64, the multiple InstructPix2Pix's own tools
round to; the tiny recipe: 2 x 2 = 4). Every photo is edited at one of a fixed set of shapes, the
long side at the chosen resolution and the short side from the nearest of `ASPECTS` (in log
ratio), landscape or portrait: at most 11 shapes per resolution, each compiled once.
"""

from __future__ import annotations

import math

# Long side / short side: square, 4:3, 3:2, 16:9, 2:1, 3:1 (and their portraits).
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3.0)


def stride(model_config) -> int:
  """The pixel multiple both image sides must be (VAE downsampling x UNet downsampling)."""
  vae = 2 ** (len(model_config.vae.block_out_channels) - 1)
  unet = 2 ** (len(model_config.unet.block_out_channels) - 1)
  return vae * unet


def bucket_for(size: tuple[int, int], resolution: int, multiple: int) -> tuple[int, int]:
  """(width, height) to edit a `size` = (width, height) photo at: long side `resolution`."""
  if resolution % multiple:
    raise ValueError(f"resolution {resolution} is not a multiple of the model's stride {multiple}")
  w, h = size
  ratio = max(w, h) / min(w, h)
  aspect = min(ASPECTS, key=lambda a: abs(math.log(ratio / a)))
  short = max(multiple, int(resolution / aspect / multiple + 0.5) * multiple)   # half up
  return (resolution, short) if w >= h else (short, resolution)


def bucket_set(resolution: int, multiple: int) -> list[tuple[int, int]]:
  """Every (width, height) `bucket_for` can return at this resolution."""
  shapes = set()
  for a in ASPECTS:
    for w, h in ((a, 1.0), (1.0, a)):
      shapes.add(bucket_for((round(1000 * w), round(1000 * h)), resolution, multiple))
  return sorted(shapes)
