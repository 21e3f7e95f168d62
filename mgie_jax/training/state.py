"""The sharded train state: trainable parameters (fp32 master copies), optimizer state, step, RNG.

The model is split at the jit boundary into (graphdef, trainable, frozen). Trainable parameters
and their optimizer state live in `TrainState` as plain dicts; the frozen towers are a separate
argument stored in the compute dtype. Everything is placed on the mesh by the logical-axis rules.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P

from mgie_jax import parallel


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict            # trainable parameters, pure dict
  opt_state: optax.OptState
  rng: jax.Array


def trainable_filter(prefixes):
  """An nnx filter selecting parameters whose dotted path starts with one of `prefixes`."""
  prefixes = tuple(prefixes)

  def select(path, value):
    name = ".".join(str(p) for p in path)
    return isinstance(value, nnx.Param) and any(name == p or name.startswith(p + ".") for p in prefixes)
  return select


@dataclasses.dataclass
class ModelParts:
  graphdef: nnx.GraphDef
  trainable_template: nnx.State     # abstract, with logical-axis metadata
  frozen_template: nnx.State

  def merge(self, params: dict, frozen: dict):
    t = _from_pure(self.trainable_template, params)
    f = _from_pure(self.frozen_template, frozen)
    return nnx.merge(self.graphdef, t, f)


def _from_pure(template: nnx.State, pure: dict) -> nnx.State:
  flat = dict(nnx.to_flat_state(template))
  leaves = {tuple(p): v for p, v in _flatten(pure)}
  return nnx.from_flat_state([(p, var.replace(leaves[tuple(p)])) for p, var in flat.items()])


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def split_model(abstract_model, prefixes) -> ModelParts:
  graphdef, trainable, frozen = nnx.split(abstract_model, trainable_filter(prefixes), ...)
  if not jax.tree.leaves(trainable):
    raise ValueError(f"no parameter matches the trainable prefixes {list(prefixes)}")
  return ModelParts(graphdef, trainable, frozen)


def shardings_of(template: nnx.State, mesh, rules) -> dict:
  return nnx.to_pure_dict(parallel.state_shardings(template, mesh, rules))


def state_shardings(parts: ModelParts, tx, mesh, rules):
  """NamedShardings for (TrainState, frozen): optimizer moments follow their parameters."""
  param_sh = shardings_of(parts.trainable_template, mesh, rules)
  replicated = NamedSharding(mesh, P())
  abstract_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.float32),
                                 nnx.to_pure_dict(parts.trainable_template))
  opt_abstract = jax.eval_shape(tx.init, abstract_params)
  opt_sh = follow_params(opt_abstract, abstract_params, param_sh, replicated)
  state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)
  return state_sh, shardings_of(parts.frozen_template, mesh, rules)


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


def cast_tree(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
