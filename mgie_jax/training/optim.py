"""Optimizer: AdamW per parameter group (MLLM, diffusion) with warmup + cosine schedules and
global-norm clipping, over the trainable parameters only. (Gradient accumulation happens inside
the train step: see mgie_jax.training.step.)"""

from __future__ import annotations

import jax
import optax


def group_of(path) -> str:
  """Parameter group by path: the UNet is 'diffusion'; embeddings, lm_head and edit head are 'mllm'."""
  return "diffusion" if path and str(path[0]) == "unet" else "mllm"


def schedule(peak: float, total_steps: int, warmup_frac: float):
  warmup = max(1, int(round(total_steps * warmup_frac)))
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(train_cfg, params):
  """optax transform for `params` (a pure dict); returns (tx, {group: schedule})."""
  total = int(train_cfg.steps)
  schedules = {"mllm": schedule(train_cfg.lr_mllm, total, train_cfg.warmup_frac),
               "diffusion": schedule(train_cfg.lr_diffusion, total, train_cfg.warmup_frac)}
  adam = lambda lr: optax.adamw(lr, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                                weight_decay=train_cfg.weight_decay)
  # top-level keys are mllm / edit_head / unet
  labels = {k: jax.tree.map(lambda _, g=group_of((k,)): g, v) for k, v in params.items()}
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.multi_transform({g: adam(s) for g, s in schedules.items()}, labels))
  return tx, schedules
