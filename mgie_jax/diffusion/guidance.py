"""InstructPix2Pix three-branch classifier-free guidance and the whole sampling loop under jit.

  eps = eps(null, 0) + s_T * (eps(U, v) - eps(null, v)) + s_I * (eps(null, v) - eps(null, 0))

U is the edit condition, null the unconditional condition, v the input image's latents
(VAE posterior mode, unscaled) and 0 zeroed image latents.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.diffusion.samplers import Sampler


def guided_eps(unet, x, t, image_latents, cond, null_cond, text_scale, image_scale):
  """One UNet call on the three branches stacked on the batch axis, combined as InstructPix2Pix does."""
  b = x.shape[0]
  latents = jnp.concatenate([x, x, x], axis=0)
  image = jnp.concatenate([image_latents, image_latents, jnp.zeros_like(image_latents)], axis=0)
  context = jnp.concatenate([cond, null_cond, null_cond], axis=0)
  eps = unet(jnp.concatenate([latents, image.astype(latents.dtype)], axis=-1), t, context)
  e_text, e_image, e_uncond = eps[:b], eps[b:2 * b], eps[2 * b:]
  return e_uncond + text_scale * (e_text - e_image) + image_scale * (e_image - e_uncond)


_step_listeners: list = []


def _report_step(done, total):
  for listener in list(_step_listeners):
    listener(int(done), int(total))


@contextlib.contextmanager
def on_step(listener):
  """Call `listener(done, total)` after each denoising step of edits run with `report_steps=True`
  (a demo's progress bar). The host callback is compiled in only where asked for."""
  _step_listeners.append(listener)
  try:
    yield
  finally:
    _step_listeners.remove(listener)


def sample_loop(unet, sampler: Sampler, latents, image_latents, cond, null_cond, noise,
                text_scale, image_scale, report_steps: bool = False):
  """The denoising loop as one lax.fori_loop. latents: N(0, 1) [B, h, w, c]; noise [steps, B, h, w, c]."""
  x = latents * sampler.init_noise_sigma

  def body(i, x):
    t = sampler.timesteps[i]
    xin = sampler.scale_model_input(i, x)
    eps = guided_eps(unet, xin, t, image_latents, cond, null_cond, text_scale, image_scale)
    x = sampler.step(i, x, eps.astype(x.dtype), noise[i] if noise is not None else None)
    if report_steps:
      jax.debug.callback(_report_step, i + 1, sampler.num_steps)   # unordered: works on a mesh
    return x

  return jax.lax.fori_loop(0, sampler.num_steps, body, x)


@functools.partial(jax.jit, static_argnames=("unet_def", "vae_def", "report_steps"))
def _edit(unet_def, unet_state, vae_def, vae_state, sampler, images, cond, null_cond, latents, noise,
          text_scale, image_scale, report_steps=False):
  unet, vae = nnx.merge(unet_def, unet_state), nnx.merge(vae_def, vae_state)
  image_latents = vae.encode(images).mode()
  x = sample_loop(unet, sampler, latents, image_latents, cond, null_cond, noise, text_scale, image_scale,
                  report_steps)
  decoded = vae.decode(x / vae.config.scaling_factor)
  return jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def draw_noise(key, sampler: Sampler, shape):
  """(initial latents [B, h, w, c], per-step noise [steps, B, h, w, c] or None) as `edit_images`
  draws them from `key`: hand them to another implementation to reproduce an edit."""
  k_lat, k_noise = jax.random.split(key)
  noise = jax.random.normal(k_noise, (sampler.num_steps,) + tuple(shape)) if sampler.needs_noise else None
  return jax.random.normal(k_lat, shape), noise


def edit_images(unet, vae, sampler: Sampler, images, cond, null_cond, *, key=None, latents=None,
                noise=None, text_scale: float = 7.5, image_scale: float = 1.5, report_steps: bool = False):
  """Edit `images` (NHWC in [-1, 1]) under condition `cond`; returns NHWC images in [0, 1].

  Randomness comes from `key` (initial latents and per-step noise), or from explicit
  `latents` [B, h, w, c] and `noise` [steps, B, h, w, c] to reproduce another implementation.
  Compiled once per (models, shapes, sampler kind, `report_steps`: see `on_step`).
  """
  b, h, w, _ = images.shape
  factor = 2 ** (len(vae.config.block_out_channels) - 1)
  shape = (b, h // factor, w // factor, vae.config.latent_channels)
  if latents is None or (noise is None and sampler.needs_noise):
    if key is None:
      raise ValueError("pass a PRNG key, or explicit latents (and noise for a stochastic sampler)")
    drawn_latents, drawn_noise = draw_noise(key, sampler, shape)
    latents = drawn_latents if latents is None else latents
    noise = drawn_noise if noise is None else noise
  if tuple(latents.shape) != shape:
    raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
  if cond.shape != null_cond.shape or cond.shape[0] != b:
    raise ValueError(f"cond {cond.shape} and null_cond {null_cond.shape} must both be [{b}, S, D]")
  unet_def, unet_state = nnx.split(unet)
  vae_def, vae_state = nnx.split(vae)
  return _edit(unet_def, unet_state, vae_def, vae_state, sampler, jnp.asarray(images), cond,
               null_cond, latents, noise, jnp.float32(text_scale), jnp.float32(image_scale),
               report_steps=report_steps)
