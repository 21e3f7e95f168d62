"""Euler-ancestral (MGIE's default), Euler and DDIM samplers, step for step as diffusers computes them.

A `Sampler` holds precomputed per-step tables; `scale_model_input(i, x)` and `step(i, x,
model_output, noise)` are pure and take a traced step index, so a whole sampling loop
compiles into one `lax.fori_loop`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mgie_jax.diffusion.schedule import NoiseSchedule

KINDS = ("euler_ancestral", "euler", "ddim")
SPACINGS = ("linspace", "leading", "trailing")
DIFFUSERS_NAMES = {"EulerAncestralDiscreteScheduler": "euler_ancestral",
                   "EulerDiscreteScheduler": "euler", "DDIMScheduler": "ddim"}


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  kind: str = "euler_ancestral"
  schedule: NoiseSchedule = NoiseSchedule()     # the model's training schedule
  timestep_spacing: str = "linspace"
  steps_offset: int = 0
  set_alpha_to_one: bool = True     # DDIM only
  eta: float = 0.0                  # DDIM only
  clip_sample: bool = False         # DDIM only: clamp predicted x0
  clip_sample_range: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"sampler kind must be one of {KINDS}, got {self.kind!r}")
    if self.timestep_spacing not in SPACINGS:
      raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {self.timestep_spacing!r}")

  @property
  def num_train_timesteps(self) -> int:
    return self.schedule.num_train_timesteps

  @classmethod
  def from_diffusers(cls, config: dict, **overrides) -> "SamplerConfig":
    """From a diffusers scheduler config (scheduler_config.json); unsupported options raise.
    `overrides` may name sampler fields or NoiseSchedule fields."""
    name = config.get("_class_name")
    kind = overrides.pop("kind", DIFFUSERS_NAMES.get(name))
    if kind is None:
      raise ValueError(f"scheduler {name!r} is not supported; known: {sorted(DIFFUSERS_NAMES)}")
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                 "thresholding"):
      if config.get(flag):
        raise ValueError(f"scheduler option {flag}=True is not supported")
    sched_names = {f.name for f in dataclasses.fields(NoiseSchedule)}
    schedule = NoiseSchedule.from_diffusers({**config, **{k: v for k, v in overrides.items() if k in sched_names}})
    overrides = {k: v for k, v in overrides.items() if k not in sched_names}
    names = {f.name for f in dataclasses.fields(cls)} - {"kind", "schedule"}
    return cls(kind=kind, schedule=schedule, **{**{k: v for k, v in config.items() if k in names}, **overrides})


def _timesteps(cfg: SamplerConfig, n: int) -> np.ndarray:
  T = cfg.num_train_timesteps
  integer = cfg.kind == "ddim"
  if cfg.timestep_spacing == "linspace":
    ts = np.linspace(0, T - 1, n, dtype=None if integer else np.float32)[::-1]
    ts = ts.round() if integer else ts
  elif cfg.timestep_spacing == "leading":
    ts = (np.arange(0, n) * (T // n)).round()[::-1] + cfg.steps_offset
  else:
    ts = np.round(np.arange(T, 0, -T / n)) - 1
  return ts.astype(np.int64 if integer else np.float32).copy()


@struct.dataclass
class Sampler:
  timesteps: jax.Array          # [n] the values the UNet sees (float for Euler, int for DDIM)
  sigmas: jax.Array             # [n + 1] Euler sigmas (zeros for DDIM)
  acp_t: jax.Array              # [n] DDIM alpha-bar at t
  acp_prev: jax.Array           # [n] DDIM alpha-bar at the previous timestep
  init_noise_sigma: jax.Array   # scalar: initial latents = N(0, 1) * this
  kind: str = struct.field(pytree_node=False, default="euler_ancestral")
  prediction_type: str = struct.field(pytree_node=False, default="epsilon")
  eta: float = struct.field(pytree_node=False, default=0.0)
  clip_sample: float | None = struct.field(pytree_node=False, default=None)

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]

  @property
  def needs_noise(self) -> bool:
    return self.kind == "euler_ancestral" or (self.kind == "ddim" and self.eta > 0)

  def scale_model_input(self, i, x):
    if self.kind == "ddim":
      return x
    return x / jnp.sqrt(self.sigmas[i] ** 2 + 1)

  def step(self, i, x, model_output, noise=None):
    """x_{i+1} from x_i and the model output at step i (noise: standard normal, like x)."""
    x32 = x.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    if self.kind == "ddim":
      prev = self._ddim(i, x32, out, noise)
    else:
      prev = self._euler(i, x32, out, noise)
    return prev.astype(model_output.dtype)

  def _euler(self, i, x, out, noise):
    sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
    if self.prediction_type == "epsilon":
      x0 = x - sigma * out
    else:
      x0 = out * (-sigma / jnp.sqrt(sigma ** 2 + 1)) + x / (sigma ** 2 + 1)
    derivative = (x - x0) / sigma
    if self.kind == "euler":
      return x + derivative * (sigma_next - sigma)
    sigma_up = jnp.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
    sigma_down = jnp.sqrt(sigma_next ** 2 - sigma_up ** 2)
    return x + derivative * (sigma_down - sigma) + noise * sigma_up

  def _ddim(self, i, x, out, noise):
    a_t, a_prev = self.acp_t[i], self.acp_prev[i]
    b_t = 1 - a_t
    if self.prediction_type == "epsilon":
      x0, eps = (x - jnp.sqrt(b_t) * out) / jnp.sqrt(a_t), out
    else:
      x0, eps = jnp.sqrt(a_t) * x - jnp.sqrt(b_t) * out, jnp.sqrt(a_t) * out + jnp.sqrt(b_t) * x
    if self.clip_sample is not None:
      x0 = jnp.clip(x0, -self.clip_sample, self.clip_sample)
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = self.eta * jnp.sqrt(variance)
    prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std ** 2) * eps
    return prev + std * noise if self.eta > 0 else prev


def make_sampler(cfg: SamplerConfig, num_steps: int) -> Sampler:
  """Tables for `num_steps` inference steps, as diffusers' `set_timesteps` builds them."""
  if num_steps < 1 or num_steps > cfg.num_train_timesteps:
    raise ValueError(f"num_steps must be in [1, {cfg.num_train_timesteps}], got {num_steps}")
  acp = cfg.schedule.alphas_cumprod()
  ts = _timesteps(cfg, num_steps)
  n = num_steps
  if cfg.kind == "ddim":
    prev_t = ts - cfg.num_train_timesteps // n
    final = 1.0 if cfg.set_alpha_to_one else acp[0]
    acp_prev = np.where(prev_t >= 0, acp[np.clip(prev_t, 0, None)], final).astype(np.float32)
    return Sampler(jnp.asarray(ts), jnp.zeros(n + 1), jnp.asarray(acp[ts]), jnp.asarray(acp_prev),
                   jnp.asarray(1.0), cfg.kind, cfg.schedule.prediction_type, cfg.eta,
                   cfg.clip_sample_range if cfg.clip_sample else None)
  if cfg.schedule.rescale_betas_zero_snr:
    acp = acp.copy()
    acp[-1] = 2.0 ** -24          # diffusers' Euler schedulers: a finite (huge) first sigma
  sig = (((1 - acp) / acp) ** 0.5).astype(np.float32)
  sig = np.interp(ts, np.arange(len(sig)), sig)
  sig = np.concatenate([sig, [0.0]]).astype(np.float32)
  init = sig.max() if cfg.timestep_spacing in ("linspace", "trailing") else (sig.max() ** 2 + 1) ** 0.5
  return Sampler(jnp.asarray(ts), jnp.asarray(sig), jnp.zeros(n), jnp.zeros(n),
                 jnp.asarray(init, jnp.float32), cfg.kind, cfg.schedule.prediction_type, cfg.eta)
