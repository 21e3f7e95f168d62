"""The tiny recipe's first stage, under <workdir>/data: the synthetic dataset (generated, then built
with the IPr2Pr builder) and a small VAE trained on its training images, saved as a diffusers
folder (<workdir>/data/vae) that the recipe then loads frozen, as the full recipe loads SD's.

Both are made once; later runs (and resumptions) reuse them.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import synthetic
from data_pipelines.ipr2pr import build
from data_pipelines.synthetic_vae import VAETraining, psnr, save_vae, train_vae
from mgie_jax.core.images import decode_rgb, mgie_square, to_model_range
from mgie_jax.models.vae import VAEConfig
from mgie_jax.run.model import synthetic_vae_dir

log = logging.getLogger(__name__)


def synthetic_dataset(workdir: str, s, seed: int) -> str:
  """Generate and build the synthetic dataset once; returns the built dataset's folder."""
  src = os.path.join(workdir, "data", "synthetic_source")
  if not os.path.exists(os.path.join(src, "expressive.json")):
    synthetic.write_dataset(src, s.prompts, s.seeds, s.size, seed, grounded=s.get("grounded", 0.0),
                            kinds=tuple(k for k in s.get("kinds", "").split(",") if k) or None)
  builder = build(src, os.path.join(workdir, "data", "tfds"), "folder", os.path.join(src, "expressive.json"))
  return str(builder.data_dir)


def images_of(data_dir: str, split: str, resolution: int, limit: int = 0) -> np.ndarray:
  """Input and edited images of a split, with MGIE's preprocessing, NHWC in [-1, 1]."""
  source = tfds.builder_from_directory(data_dir).as_data_source(split)
  n = len(source) if not limit else min(limit, len(source))
  out = []
  for i in range(n):
    r = source[i]
    for k in ("input_image", "edited_image"):
      out.append(to_model_range(mgie_square(decode_rgb(r[k])), resolution))
  return np.stack(out)


def synthetic_vae(workdir: str, data_dir: str, c) -> str:
  """Train the VAE once (config.model.vae architecture, config.vae_training options) on the
  training split at config.data.resolution; report its PSNR on the test split."""
  folder = synthetic_vae_dir(workdir)
  if os.path.exists(os.path.join(folder, "config.json")):
    return folder
  train = images_of(data_dir, "train", c.data.resolution)
  held_out = images_of(data_dir, "test", c.data.resolution)
  cfg = VAEConfig(**dict(c.model.vae))
  opts = VAETraining(**dict(c.vae_training), seed=c.seed)
  log.info("training the synthetic data's VAE: %d images at %d px, %d steps", len(train), c.data.resolution,
           opts.steps)
  vae = train_vae(train, cfg, opts)
  report = {"psnr_test_db": psnr(vae, held_out), "psnr_train_db": psnr(vae, train[:256]),
            "scaling_factor": vae.config.scaling_factor, "images": len(train), "resolution": c.data.resolution,
            **dict(c.vae_training)}
  tmp = folder + ".tmp"
  save_vae(vae, tmp)
  with open(os.path.join(tmp, "training.json"), "w") as f:
    json.dump(report, f, indent=1)
  os.replace(tmp, folder)
  log.info("VAE saved to %s: PSNR %.2f dB on held-out test images (%.2f dB train)", folder,
           report["psnr_test_db"], report["psnr_train_db"])
  return folder
