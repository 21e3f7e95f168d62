"""Train a small KL-regularised autoencoder (diffusers' AutoencoderKL layout) on a folder of images,
so that configs without Stable Diffusion's VAE (the tiny synthetic recipe) have a frozen VAE whose
decode(encode(x)) is x: it is saved as a diffusers folder and loaded exactly as SD's VAE is.

Loss: L1 + MSE reconstruction of a posterior sample (means over pixels) + kl_weight x KL(q(z|x) ||
N(0, I)) (a mean over latent elements: the weight is per element, so a small one keeps the posterior
narrow, as SD's is, and the diffusion model's targets nearly deterministic).
The folder's `scaling_factor` is set to 1 / std of the training latents (SD's 0.18215 plays the
same role), so the diffusion model sees unit-variance latents.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mgie_jax.convert.diffusion import derived_rules
from mgie_jax.convert.mapping import export_state_dict
from mgie_jax.convert.save import save_diffusers, vae_config
from mgie_jax.models.vae import AutoencoderKL, VAEConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VAETraining:
  steps: int = 1500
  batch_size: int = 32
  lr: float = 2e-3
  kl_weight: float = 1e-6
  seed: int = 0


def _loss(vae, x, key, kl_weight):
  post = vae.encode(x)
  z = post.mean + post.std * jax.random.normal(key, post.mean.shape)
  rec = vae.decode(z)
  kl = 0.5 * jnp.mean(post.mean ** 2 + jnp.exp(post.logvar) - 1.0 - post.logvar)
  recon = jnp.mean(jnp.abs(rec - x)) + jnp.mean((rec - x) ** 2)
  return recon + kl_weight * kl, (recon, kl)


def train_vae(images: np.ndarray, cfg: VAEConfig, opts: VAETraining = VAETraining()) -> AutoencoderKL:
  """`images` NHWC in [-1, 1] -> a trained AutoencoderKL (scaling_factor set from the data)."""
  vae = AutoencoderKL(cfg, rngs=nnx.Rngs(opts.seed))
  sched = optax.warmup_cosine_decay_schedule(0.0, opts.lr, max(1, opts.steps // 20), opts.steps, opts.lr * 0.05)
  optimizer = nnx.Optimizer(vae, optax.adamw(sched, weight_decay=0.0), wrt=nnx.Param)

  @nnx.jit
  def step(vae, optimizer, x, key):
    (loss, aux), grads = nnx.value_and_grad(_loss, has_aux=True)(vae, x, key, opts.kl_weight)
    optimizer.update(vae, grads)
    return loss, aux

  rng = np.random.default_rng(opts.seed)
  key = jax.random.key(opts.seed)
  t0 = time.time()
  for i in range(opts.steps):
    batch = images[rng.integers(0, len(images), opts.batch_size)]
    if rng.random() < 0.5:
      batch = batch[:, :, ::-1]            # flips: the autoencoder should not care about layout
    loss, (recon, kl) = step(vae, optimizer, jnp.asarray(batch), jax.random.fold_in(key, i))
    if (i + 1) % max(1, opts.steps // 5) == 0:
      log.info("vae step %d/%d: reconstruction %.4f, kl %.3f (%.0f s)", i + 1, opts.steps, float(recon),
               float(kl), time.time() - t0)
  scale = 1.0 / float(np.std(np.asarray(latents(vae, images[:256]))))
  return _with_scaling(vae, scale)


def _with_scaling(vae: AutoencoderKL, scale: float) -> AutoencoderKL:
  graphdef, state = nnx.split(vae)
  new = nnx.eval_shape(lambda: AutoencoderKL(dataclasses.replace(vae.config, scaling_factor=scale),
                                             rngs=nnx.Rngs(0)))
  new_def, _ = nnx.split(new)
  return nnx.merge(new_def, state)


@nnx.jit
def _encode_mean(vae, x):
  return vae.encode(x).mean


@nnx.jit
def _reconstruct(vae, x):
  return vae.decode(vae.encode(x).mean)


def latents(vae, images, batch: int = 64):
  return np.concatenate([np.asarray(_encode_mean(vae, jnp.asarray(images[i:i + batch])))
                         for i in range(0, len(images), batch)])


def psnr(vae, images: np.ndarray, batch: int = 64) -> float:
  """Mean PSNR (dB, on [0, 1]) of decode(mode(encode(x))) against x, `images` in [-1, 1]."""
  scores = []
  for i in range(0, len(images), batch):
    x = images[i:i + batch]
    rec = np.clip(np.asarray(_reconstruct(vae, jnp.asarray(x))), -1, 1)
    mse = np.mean(((rec - x) / 2) ** 2, axis=(1, 2, 3))
    scores += list(10 * np.log10(1.0 / np.maximum(mse, 1e-10)))
  return float(np.mean(scores))


def save_vae(vae: AutoencoderKL, folder: str) -> str:
  """A diffusers AutoencoderKL folder that AutoencoderKL.from_pretrained (ours or diffusers') loads."""
  save_diffusers(export_state_dict(vae, derived_rules(vae), dtype=np.float32), vae_config(vae.config), folder)
  return folder
