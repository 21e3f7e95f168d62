"""The sharded train state: trainable parameters (fp32 master copies), optimizer state, step, RNG.

The model is split at the jit boundary into (graphdef, trainable, frozen) (mgie_jax.run.model).
Trainable parameters and their optimizer state live in `TrainState` as plain dicts; the frozen
towers are a separate argument stored in the compute dtype. Everything is placed on the mesh by
the logical-axis rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mgie_jax.run.model import Placement


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict            # trainable parameters, pure dict
  opt_state: optax.OptState
  rng: jax.Array
  ema: dict | None = None  # exponential moving average of `params` (train.ema_decay > 0), else None


def state_shardings(placed: Placement, tx, ema: bool = False) -> TrainState:
  """NamedShardings of the TrainState: optimizer moments and the EMA follow their parameters."""
  param_sh = placed.trainable_sh
  replicated = NamedSharding(placed.mesh, P())
  abstract_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.float32),
                                 nnx.to_pure_dict(placed.parts.trainable_template))
  opt_abstract = jax.eval_shape(tx.init, abstract_params)
  opt_sh = follow_params(opt_abstract, abstract_params, param_sh, replicated)
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated,
                    ema=param_sh if ema else None)


def ema_decay_at(step, decay: float):
  """The EMA's decay after `step` updates: warmed up as (1 + step) / (10 + step), capped at
  `decay` (diffusers' EMAModel), so a short run's average is not dominated by its random init."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def start_ema(params: dict, shardings: dict) -> dict:
  """The EMA's first value: a copy of `params` on `shardings` (a copy, since the train step
  donates both trees)."""
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)


def update_ema(ema: dict, params: dict, step, decay: float) -> dict:
  return optax.incremental_update(params, ema, 1.0 - ema_decay_at(step, decay))


def _key(k):
  return getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))


def follow_params(tree, params, param_shardings, default):
  """Shardings for an optimizer state: a leaf whose path ends with a parameter's path (and has
  its shape) gets that parameter's sharding; counters and the like get `default`."""
  by_path = {}
  shapes = dict((tuple(_key(k) for k in p), v.shape) for p, v in jax.tree_util.tree_flatten_with_path(params)[0])
  for p, sh in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
    by_path[tuple(_key(k) for k in p)] = sh
  longest = max(map(len, by_path)) if by_path else 0

  def pick(path, leaf):
    keys = tuple(_key(k) for k in path)
    for n in range(min(longest, len(keys)), 0, -1):
      tail = keys[-n:]
      if tail in by_path and shapes[tail] == getattr(leaf, "shape", None):
        return by_path[tail]
    return default
  return jax.tree_util.tree_map_with_path(pick, tree)
