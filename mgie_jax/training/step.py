"""The jit-compiled train step: joint loss, gradients of the trainable parameters, optax update."""

from __future__ import annotations

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mgie_jax import parallel
from mgie_jax.models.mgie import sample_draws


def make_train_step(run, resolution: int, fixed_draws: bool = False):
  """`step(state, frozen, batch) -> (state, metrics)` for a Setup. Randomness: the state's key
  folded with the step (`fixed_draws` reuses one draw every step, for overfitting tests)."""
  mcfg, mesh, rules, tx = run.mcfg, run.mesh, run.rules, run.tx
  factor = 2 ** (len(mcfg.vae.block_out_channels) - 1)
  latent_shape = (resolution // factor,) * 2 + (mcfg.vae.latent_channels,)

  def train_step(state, frozen, batch):
    key = jax.random.wrap_key_data(state.rng)
    if not fixed_draws:
      key = jax.random.fold_in(key, state.step)
    draws = sample_draws(key, batch["input_ids"].shape[0], latent_shape, mcfg.num_train_timesteps)

    def loss_fn(params):
      with parallel.activate(mesh, rules):
        out = run.model(params, frozen).losses(batch, draws)
      return out["loss"], out

    (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**out, "grad_norm": optax.global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def batch_sharding(run) -> NamedSharding:
  return NamedSharding(run.mesh, parallel.logical_to_spec(("batch",), run.rules))


def jit_train_step(run, resolution: int, **kw):
  """jax.jit with explicit in/out shardings and the state's buffers donated."""
  return jax.jit(make_train_step(run, resolution, **kw),
                 in_shardings=(run.state_sh, run.frozen_sh, batch_sharding(run)),
                 out_shardings=(run.state_sh, NamedSharding(run.mesh, P())), donate_argnums=(0,))
