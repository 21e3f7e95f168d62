"""What an evaluation sweep edits with: a trained MGIE checkpoint, a pretrained MGIE (e.g. the
released mllm.pt / unet.pt), an InstructPix2Pix diffusers folder conditioned on its CLIP text
encoder, or the copy-the-input baseline. Each splits an edit in two: `conditions` (the part that
depends only on the model and the example: for MGIE the expressive instruction and the edit-head
condition) and `sample` (guidance scales, sampler and noise), so a sweep computes the first once
and reuses it over its grid of scales and seeds.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mgie_jax.convert import from_pretrained
from mgie_jax.convert.metric_models import clip_text_from_pretrained
from mgie_jax.core.images import clip_view, mgie_square, to_model_range
from mgie_jax.diffusion import SamplerConfig, edit_images, make_sampler
from mgie_jax.diffusion.schedule import NoiseSchedule
from mgie_jax.inference import pipeline as inference
from mgie_jax.models import AutoencoderKL, UNet2DConditionModel


@dataclasses.dataclass
class Conditions:
  texts: list            # the expressive instructions (or the instructions themselves)
  cond: jax.Array | None
  null: jax.Array | None


class Editor:
  name: str = ""
  step: int | None = None
  resolution: int = 512             # the sampling resolution of the current setting
  default_resolution: int = 512     # used when a setting says 0
  latent_channels: int = 4
  latent_factor: int = 8

  def conditions(self, images, instructions, references=None) -> Conditions:
    """`references`: the examples' reference expressive instructions (used by an MGIE editor
    built with text="reference"; the others ignore them)."""
    raise NotImplementedError

  def sample(self, images, conds: Conditions, latents, noise, *, text_scale, image_scale, sampler) -> np.ndarray:
    raise NotImplementedError

  def text_scores(self, images, examples, texts) -> list[dict]:
    """Scores of the written text against the examples' reference expressive instructions (none
    for editors that write none)."""
    return [{} for _ in examples]

  def squares(self, images) -> np.ndarray:
    """MGIE's preprocessing: centre square, 512, then the sampling resolution, in [-1, 1]."""
    return np.stack([to_model_range(mgie_square(im.convert("RGB")), self.resolution) for im in images])


class DiffusionEditor(Editor):
  """Shared sampling: InstructPix2Pix guidance on this editor's UNet and VAE."""

  def __init__(self, unet, vae, noise: NoiseSchedule, mesh=None):
    self.unet, self.vae, self.noise, self.mesh = unet, vae, noise, mesh
    self.latent_channels = vae.config.latent_channels
    self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)

  def sample(self, images, conds, latents, noise, *, text_scale, image_scale, sampler):
    kind, steps = sampler
    s = make_sampler(SamplerConfig(kind=kind, schedule=self.noise), steps)
    ctx = jax.set_mesh(self.mesh) if self.mesh is not None else _nullcontext()
    with ctx:
      out = edit_images(self.unet, self.vae, s, jnp.asarray(self.squares(images)), conds.cond, conds.null,
                        latents=jnp.asarray(latents), noise=None if noise is None else jnp.asarray(noise),
                        text_scale=text_scale, image_scale=image_scale)
    return np.asarray(jnp.round(out * 255)).astype(np.uint8)


class MGIEEditor(DiffusionEditor):
  """A model trained here: MGIE (expressive instruction + edit head) or the text-only baseline."""

  def __init__(self, name, model, tok, *, step=None, resolution=512, max_new_tokens=96, mesh=None,
               text="written"):
    """text="written": MGIE writes its expressive instructions (the real editor); "reference":
    conditioned on each example's reference expressive instruction instead (a diagnostic that
    separates the MLLM's writing from the edit head and UNet; rows are named <name>+reference)."""
    super().__init__(model.unet, model.vae, model.config.noise, mesh)
    self.reference = text == "reference" and hasattr(model, "mllm")
    self.name = f"{name}+reference" if self.reference else name
    self.model, self.tok, self.step = model, tok, step
    self.resolution = self.default_resolution = resolution
    self.max_new_tokens = max_new_tokens

  def conditions(self, images, instructions, references=None):
    if self.reference and (references is None or not all(references)):
      raise ValueError(f"{self.name}: every example needs a reference expressive instruction")
    size = self.model.config.clip_size
    clip = np.stack([clip_view(mgie_square(im.convert("RGB")), size) for im in images])
    ctx = jax.set_mesh(self.mesh) if self.mesh is not None else _nullcontext()
    with ctx:
      texts, cond, null = inference.conditions(self.model, self.tok, clip, instructions,
                                               max_new_tokens=self.max_new_tokens,
                                               references=list(references) if self.reference else None)
    return Conditions(texts, cond, null)

  def text_scores(self, images, examples, texts):
    """exp_exact: the written expressive instruction equals the reference (case and spacing
    aside); exp_token_acc: teacher-forced next-token accuracy on the reference's tokens (the
    expressive instruction, [IMG0..7] and </s>), as the training loss sees them."""
    if not hasattr(self.model, "mllm") or not all(e.expressive for e in examples):
      return [{} for _ in examples]
    norm = lambda t: " ".join(t.lower().split()).rstrip(".")
    size = self.model.config.clip_size
    clip = np.stack([clip_view(mgie_square(im.convert("RGB")), size) for im in images])
    acc = inference.teacher_forced_accuracy(self.model, self.tok, clip, [e.instruction for e in examples],
                                            [e.expressive for e in examples])
    return [{"exp_exact": float(norm(t) == norm(e.expressive)), "exp_token_acc": float(a)}
            for t, e, a in zip(texts, examples, acc)]


class InstructPix2PixEditor(DiffusionEditor):
  """A diffusers InstructPix2Pix pipeline folder: cond = its CLIP text encoder's last hidden
  states of the instruction (77 tokens), null = those of the empty prompt."""

  def __init__(self, name, folder, *, resolution=512, dtype=None):
    import transformers
    unet = from_pretrained(UNet2DConditionModel, os.path.join(folder, "unet"), dtype)
    vae = from_pretrained(AutoencoderKL, os.path.join(folder, "vae"), dtype)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
      noise = NoiseSchedule.from_diffusers(json.load(f))
    super().__init__(unet, vae, noise)
    self.name = name
    self.resolution = self.default_resolution = resolution
    self.text_encoder = clip_text_from_pretrained(os.path.join(folder, "text_encoder"), dtype)
    self.tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))

  def encode(self, prompts):
    enc = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=self.tokenizer.model_max_length)
    return self.text_encoder(jnp.asarray(enc["input_ids"]))[0]

  def conditions(self, images, instructions, references=None):
    cond = self.encode(instructions)
    return Conditions(list(instructions), cond, self.encode([""] * len(instructions)))


class CopyInput(Editor):
  """The edited image is the input: it beats every model on some metrics; always reported."""
  name = "copy-input"

  def conditions(self, images, instructions, references=None):
    return Conditions(["" for _ in instructions], None, None)

  def sample(self, images, conds, latents, noise, **kw):
    return None        # the sweep scores the input images themselves


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False
