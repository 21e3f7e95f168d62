"""The training batch, defined once: which arrays it holds, their shapes and dtypes. The loader
makes exactly these (data_pipelines.loader), the trainer places them and compiles for them, and
the AOT compiler compiles for the same shapes (mgie_jax.compile).

  input_image, edited_image      f32 [B, R, R, 3] in [-1, 1]     (R = config.data.resolution)
  clip_image                     f32 [B, C, C, 3]                (CLIP-normalised view of the input)
  input_ids, labels, attention_mask  int32 [B, L]                (L = a length bucket <= max_length)
  instruction_ids, instruction_mask  int32 [B, T]                (the terse instruction alone, when
                                                                  config.data.text_length = T > 0)

With a frozen-feature cache (config.data.features), the frozen towers' outputs replace the images:
  edited_latent_mean, edited_latent_logvar, input_latent_mean   f32 [B, R/8, R/8, 4]
  clip_features                  f32 [B, num_image_tokens, CLIP hidden]  (what the projector reads)
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mgie_jax.models.mgie import feature_shapes

IMAGES = ("input_image", "edited_image")
TOKENS = ("input_ids", "labels", "attention_mask")         # cut to a length bucket
INSTRUCTION = ("instruction_ids", "instruction_mask")


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  resolution: int
  clip_resolution: int
  max_length: int
  num_image_tokens: int            # the <im_patch> run the token sequence holds
  text_length: int = 0
  features: tuple = ()             # ((name, shape), ...): cached frozen features instead of images
  template: str = "llava_v1"       # the prompt the token arrays hold (text/template.py)

  def fields(self, length: int | None = None) -> dict:
    """name -> (shape of one example, numpy dtype); token arrays at `length` (default max_length)."""
    r, cr, n = self.resolution, self.clip_resolution, length or self.max_length
    if self.features:
      out = {name: (tuple(shape), np.float32) for name, shape in self.features}
    else:
      out = {"input_image": ((r, r, 3), np.float32), "edited_image": ((r, r, 3), np.float32),
             "clip_image": ((cr, cr, 3), np.float32)}
    out.update({k: ((n,), np.int32) for k in TOKENS})
    if self.text_length:
      out.update({k: ((self.text_length,), np.int32) for k in INSTRUCTION})
    return out

  def abstract(self, batch: int, sharding, length: int | None = None) -> dict:
    """The global batch as ShapeDtypeStructs on `sharding` (what the train step is compiled for)."""
    return {k: jax.ShapeDtypeStruct((batch,) + shape, dtype, sharding=sharding)
            for k, (shape, dtype) in self.fields(length).items()}

  def loader_options(self) -> dict:
    """The data_pipelines.loader.LoaderConfig fields that shape the batch."""
    return dict(resolution=self.resolution, clip_resolution=self.clip_resolution, max_length=self.max_length,
                num_image_tokens=self.num_image_tokens, text_length=self.text_length,
                feature_fields=self.features, template=self.template)


def batch_spec(c, model_config, max_length: int | None = None) -> BatchSpec:
  """The batch of config `c` for a built model's config (its CLIP view and image-token count)."""
  features = ()
  if c.data.get("features", ""):
    features = tuple(feature_shapes(model_config, int(c.data.resolution)).items())
  return BatchSpec(resolution=int(c.data.resolution), clip_resolution=int(model_config.clip_size),
                   max_length=int(max_length or c.data.max_length),
                   num_image_tokens=int(getattr(model_config, "prompt_image_tokens", model_config.num_image_tokens)),
                   text_length=int(c.data.get("text_length", 0) or 0), features=features,
                   template=getattr(model_config, "template", "llava_v1"))


def length_buckets(c) -> list:
  """The token lengths batches are padded to: config.data.length_buckets, up to max_length."""
  n = int(c.data.max_length)
  return sorted({int(b) for b in (c.data.get("length_buckets", None) or ()) if 0 < int(b) < n} | {n})


def bucket_for(longest: int, buckets: list) -> int:
  """The shortest bucket holding `longest` tokens."""
  return next(b for b in buckets if b >= longest)
