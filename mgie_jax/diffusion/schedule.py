"""The DDPM training schedule: betas, `add_noise`, epsilon / v-prediction targets (diffusers' math)."""

from __future__ import annotations

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


@struct.dataclass
class DDPMSchedule:
  alphas_cumprod: jax.Array                      # [T] float32
  prediction_type: str = struct.field(pytree_node=False, default="epsilon")

  @classmethod
  def create(cls, beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
             beta_start: float = 0.00085, beta_end: float = 0.012,
             prediction_type: str = "epsilon") -> "DDPMSchedule":
    if prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
    return cls(jnp.asarray(alphas_cumprod(betas)), prediction_type)

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
