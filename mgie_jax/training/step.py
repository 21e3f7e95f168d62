"""The jit-compiled train step: joint loss, gradients of the trainable parameters, optax update.

Gradient accumulation happens inside the step (`train.grad_accum` micro-batches under a
`lax.scan`), not across steps with `optax.MultiSteps`: L_ins is a mean over the *batch's*
target tokens, so each micro-batch's loss is divided by the whole batch's token count and the
summed gradients equal the full batch's exactly. One step is one optimizer update.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mgie_jax.core import parallel
from mgie_jax.models import lora
from mgie_jax.models.mgie import sample_draws
from mgie_jax.training.state import update_ema

LORA_DROPOUT_STREAM = 0x4C6F5241   # folded into the step's key: dropout masks apart from the diffusion draws


def _micro(tree, accum: int, j):
  """Micro-batch j of `accum`: rows j, j + accum, ... (each device keeps its own rows)."""
  def take(x):
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
    return jax.lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False)
  return jax.tree.map(take, tree)


def make_train_step(run, resolution: int, fixed_draws: bool = False):
  """`step(state, frozen, batch) -> (state, metrics)` for a Setup. Randomness: the state's key
  folded with the step (`fixed_draws` reuses one draw every step, for overfitting tests)."""
  mcfg, mesh, rules, tx = run.mcfg, run.mesh, run.rules, run.tx
  ema_decay = float(run.config.train.get("ema_decay", 0.0))
  accum = int(run.config.train.grad_accum)
  factor = 2 ** (len(mcfg.vae.block_out_channels) - 1)
  latent_shape = (resolution // factor,) * 2 + (mcfg.vae.latent_channels,)
  batch_spec = NamedSharding(mesh, parallel.logical_to_spec(("batch",), rules))

  def train_step(state, frozen, batch):
    key = jax.random.wrap_key_data(state.rng)
    if not fixed_draws:
      key = jax.random.fold_in(key, state.step)
    rows = jax.tree.leaves(batch)[0].shape[0]
    draws = sample_draws(key, rows, latent_shape, mcfg.num_train_timesteps)
    # The whole batch's denominators, so that micro-batch losses add up to the batch's.
    tokens, rows = mcfg.denominators(batch)

    lora_dropout = getattr(getattr(mcfg, "lora", None), "dropout", 0.0)
    dropout_key = jax.random.fold_in(key, LORA_DROPOUT_STREAM)

    def loss_fn(params, micro, micro_draws, j=0):
      with parallel.activate(mesh, rules), (
          lora.dropout(jax.random.fold_in(dropout_key, j)) if lora_dropout else contextlib.nullcontext()):
        out = run.model(params, frozen).losses(micro, micro_draws, tokens, rows)
      return out["loss"], out

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (_, out), grads = grad_fn(state.params, batch, draws)
    else:
      def body(carry, j):
        micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_spec),
                             _micro((batch, draws), accum, j))
        (_, o), g = grad_fn(state.params, *micro, j)
        return jax.tree.map(jnp.add, carry, (o, g)), None
      zero_out = {"loss": jnp.float32(0), "ins": jnp.float32(0), "edit": jnp.float32(0),
                  "no_img": jnp.int32(0)}
      zeros = (zero_out, jax.tree.map(jnp.zeros_like, state.params))
      (out, grads), _ = jax.lax.scan(body, zeros, jnp.arange(accum))
    with jax.named_scope("optimizer"):      # names the update's ops in profiles
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = {**out, "grad_norm": optax.tree.norm(grads)}
    ema = state.ema if state.ema is None else update_ema(state.ema, params, state.step, ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

  return train_step


def batch_sharding(run) -> NamedSharding:
  return NamedSharding(run.mesh, parallel.logical_to_spec(("batch",), run.rules))


def jit_train_step(run, resolution: int, **kw):
  """jax.jit with explicit in/out shardings and the state's buffers donated."""
  return jax.jit(make_train_step(run, resolution, **kw),
                 in_shardings=(run.state_sh, run.frozen_sh, batch_sharding(run)),
                 out_shardings=(run.state_sh, NamedSharding(run.mesh, P())), donate_argnums=(0,))
