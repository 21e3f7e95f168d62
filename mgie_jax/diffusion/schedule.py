"""The noise schedule, defined once: `NoiseSchedule` (the config a model is trained with, read
from diffusers' `scheduler_config.json` or a checkpoint's config), the DDPM training side
(`add_noise`, epsilon / v targets) and, in `samplers`, every inference sampler built on it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_betas(kind: str = "scaled_linear", num_train_timesteps: int = 1000,
               beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
  """float32 betas as diffusers computes them (SD: scaled-linear 0.00085 -> 0.012 over 1000 steps)."""
  if kind == "linear":
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
  if kind == "scaled_linear":
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float32) ** 2
  raise ValueError(f"beta schedule must be one of {BETA_SCHEDULES}, got {kind!r}")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
  return np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Betas whose last alpha-bar is exactly 0 (Lin et al. 2024, diffusers' `rescale_betas_zero_snr`):
  sqrt(alpha-bar) shifted and scaled to keep its first value and end at 0. Without it the noisiest
  training step still holds sqrt(0.0047) of the clean latents (SD's schedule), which a model
  trained from scratch learns to rely on and sampling, started from pure noise, never provides."""
  root = np.sqrt(alphas_cumprod(betas))
  first, last = root[0].copy(), root[-1].copy()
  root = (root - last) * (first / (first - last))
  bar = root ** 2
  alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
  return (1.0 - alphas).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """What a diffusion model was trained with; training and every sampler read it from here."""
  beta_schedule: str = "scaled_linear"
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  prediction_type: str = "epsilon"
  rescale_betas_zero_snr: bool = False      # pure noise at the last timestep (needs v-prediction)

  def __post_init__(self):
    if self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"beta schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
    if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
      raise ValueError("rescale_betas_zero_snr needs prediction_type='v_prediction': at zero SNR the "
                       "noise alone says nothing about the image")

  @classmethod
  def from_diffusers(cls, config: dict) -> "NoiseSchedule":
    """From a diffusers scheduler config (any scheduler class: they share these fields)."""
    if config.get("trained_betas") is not None:
      raise ValueError("trained_betas are not supported")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})

  def betas(self) -> np.ndarray:
    betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
    return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

  def alphas_cumprod(self) -> np.ndarray:
    return alphas_cumprod(self.betas())

  def ddpm(self) -> "DDPMSchedule":
    return DDPMSchedule(jnp.asarray(self.alphas_cumprod()), self.prediction_type)


@struct.dataclass
class DDPMSchedule:
  alphas_cumprod: jax.Array                      # [T] float32
  prediction_type: str = struct.field(pytree_node=False, default="epsilon")

  @classmethod
  def create(cls, beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
             beta_start: float = 0.00085, beta_end: float = 0.012,
             prediction_type: str = "epsilon") -> "DDPMSchedule":
    return NoiseSchedule(beta_schedule, num_train_timesteps, beta_start, beta_end, prediction_type).ddpm()

  @property
  def num_train_timesteps(self) -> int:
    return self.alphas_cumprod.shape[0]

  def _coeffs(self, t, ndim):
    acp = self.alphas_cumprod[t].reshape((-1,) + (1,) * (ndim - 1))
    return jnp.sqrt(acp), jnp.sqrt(1.0 - acp)

  def add_noise(self, x0, noise, t):
    """q(x_t | x_0): sqrt(acp_t) x0 + sqrt(1 - acp_t) noise, t int [B]."""
    a, s = self._coeffs(t, x0.ndim)
    return (a * x0 + s * noise).astype(x0.dtype)

  def velocity(self, x0, noise, t):
    a, s = self._coeffs(t, x0.ndim)
    return (a * noise - s * x0).astype(x0.dtype)

  def target(self, x0, noise, t):
    """What the UNet is trained to predict."""
    return noise if self.prediction_type == "epsilon" else self.velocity(x0, noise, t)
