"""A text-only InstructPix2Pix: the same UNet and VAE as MGIE, conditioned on a CLIP-style text
encoder of the terse instruction instead of MGIE's edit head. The baseline MGIE claims to beat
when an instruction needs the image to be understood. Trained with the same diffusion loss and
CFG dropout (the null condition is the encoding of the empty prompt).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from mgie_jax.diffusion.schedule import NoiseSchedule
from mgie_jax.models.clip import ClipTextConfig, ClipTextModel
from mgie_jax.models.mgie import Draws, diffusion_loss
from mgie_jax.models.unet import UNet2DConditionModel, UNetConfig
from mgie_jax.models.vae import AutoencoderKL, VAEConfig


@dataclasses.dataclass(frozen=True)
class IP2PConfig:
  text: ClipTextConfig
  unet: UNetConfig
  vae: VAEConfig
  bos_id: int = 1
  eos_id: int = 2
  text_length: int = 32            # instruction tokens (bos ... eos, padded)
  uncond_prob: float = 0.05
  edit_loss_weight: float = 1.0
  noise: NoiseSchedule = NoiseSchedule()
  min_snr_gamma: float = 0.0
  # The CLIP view and MLLM token sequence the shared training loader still makes (unread here).
  clip_size: int = 224
  num_image_tokens: int = 0

  @property
  def num_train_timesteps(self) -> int:
    return self.noise.num_train_timesteps

  def denominators(self, batch):
    return jnp.zeros((), jnp.int32), batch["instruction_ids"].shape[0]


class InstructPix2Pix(nnx.Module):

  def __init__(self, cfg: IP2PConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.text_encoder = ClipTextModel(cfg.text, rngs=rngs)
    self.unet = UNet2DConditionModel(cfg.unet, rngs=rngs)
    self.vae = AutoencoderKL(cfg.vae, rngs=rngs)

  def encode(self, ids, mask):
    """Token ids [B, L] (bos ... eos, then padding) -> the condition [B, L, D]."""
    return self.text_encoder(ids, mask)[0]

  def null_condition(self, batch: int, length: int):
    ids = jnp.zeros((batch, length), jnp.int32).at[:, 0].set(self.config.bos_id).at[:, 1].set(self.config.eos_id)
    mask = jnp.zeros((batch, length), jnp.int32).at[:, :2].set(1)
    return self.encode(ids, mask)

  def conditions(self, ids, mask):
    return self.encode(ids, mask), self.null_condition(ids.shape[0], ids.shape[1])

  def losses(self, batch: dict, draws: Draws, ins_tokens=None, edit_rows=None) -> dict:
    """The diffusion loss of one batch (`ins` is 0: there is no language-model term)."""
    cond, null = self.conditions(batch["instruction_ids"], batch["instruction_mask"])
    ok = jnp.ones((cond.shape[0],), bool)
    rows = cond.shape[0] if edit_rows is None else edit_rows
    l_edit = diffusion_loss(self.unet, self.vae, self.config, batch, draws, cond, null, ok, rows)
    zero = jnp.zeros((), jnp.float32)
    return {"loss": self.config.edit_loss_weight * l_edit, "ins": zero, "edit": l_edit,
            "no_img": jnp.zeros((), jnp.int32)}
