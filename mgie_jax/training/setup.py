"""What training builds from a config: tokenizer, model structure, optimizer, shardings, and the
(sharded) initial or restored state."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax import build as build_lib
from mgie_jax import parallel
from mgie_jax.models.mgie import MGIE, MGIEConfig
from mgie_jax.text import LlamaTokenizer
from mgie_jax.training.checkpoint import abstract_with_shardings
from mgie_jax.training.optim import make_optimizer
from mgie_jax.training.state import (ModelParts, TrainState, cast_tree, split_model, state_shardings,
                                     start_ema, trainable_filter, uses_ema)


@dataclasses.dataclass
class Setup:
  config: object
  tok: LlamaTokenizer
  mcfg: MGIEConfig
  parts: ModelParts
  tx: object
  schedules: dict
  mesh: object
  rules: tuple
  state_sh: object
  frozen_sh: object
  built: build_lib.Built

  def init_state(self):
    """(TrainState, None) from the seed or the pretrained weights; traceable."""
    c = self.config
    if self.built.plan is None:
      model = self.built.cls(self.mcfg, rngs=nnx.Rngs(c.seed))
      _, trainable, _ = nnx.split(model, trainable_filter(c.trainable), ...)
      params = nnx.to_pure_dict(trainable)
    else:                # shapes only (abstract_state); new_state places the loaded values
      params = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), nnx.to_pure_dict(self.parts.trainable_template))
    params = cast_tree(params, jnp.float32)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                       rng=jax.random.key_data(jax.random.key(c.seed)),
                       ema=jax.tree.map(jnp.copy, params) if uses_ema(c) else None)
    return state, None

  def abstract_state(self):
    with jax.set_mesh(self.mesh):
      state, _ = jax.eval_shape(self.init_state)
    return abstract_with_shardings(state, self.state_sh)

  def new_state(self):
    if self.built.plan is not None:
      return self._pretrained_state(), self.frozen()
    with jax.set_mesh(self.mesh):
      state = jax.jit(lambda: self.init_state()[0], out_shardings=self.state_sh)()
    return state, self.frozen()

  def _pretrained_state(self):
    """Trainable parameters from their files straight onto their shardings (fp32 master copies),
    then the optimizer state built on the devices."""
    from mgie_jax.parallel import place_tree
    params = place_tree(self.built.plan.loaders, nnx.to_pure_dict(self.parts.trainable_template),
                        self.state_sh.params, jnp.float32)
    with jax.set_mesh(self.mesh):
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_sh.opt_state)(params)
      rng = jax.device_put(jax.random.key_data(jax.random.key(self.config.seed)), self.state_sh.rng)
      step = jax.device_put(jnp.zeros((), jnp.int32), self.state_sh.step)
      ema = start_ema(params, self.state_sh.ema) if uses_ema(self.config) else None
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng, ema=ema)

  def frozen(self):
    """Frozen towers are not checkpointed: rebuilt from their source (seeded init or pretrained)."""
    return build_lib.frozen_params(self.config, self.built, self.parts, self.frozen_sh, self.mesh)

  def model(self, params, frozen) -> MGIE:
    return self.parts.merge(params, frozen)


def eval_params(state) -> dict:
  """The parameters to sample, validate and export with: the EMA when training keeps one."""
  return state.params if state.ema is None else state.ema


def make_setup(c, tokenizer_dir: str, devices=None, workdir=None) -> Setup:
  tok = LlamaTokenizer.from_pretrained(tokenizer_dir)
  return setup_for(c, tok, build_lib.build(c, tok, workdir), devices)


def setup_for(c, tok, built: build_lib.Built, devices=None) -> Setup:
  """The Setup of an already built model structure (mgie_jax.compile: no tokenizer, no files)."""
  mesh = parallel.make_mesh(**dict(c.mesh), devices=devices)
  rules = tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in c.rules)
  parts = split_model(built.abstract, c.trainable)
  tx, schedules = make_optimizer(c.train, nnx.to_pure_dict(parts.trainable_template))
  state_sh, frozen_sh = state_shardings(parts, tx, mesh, rules, ema=uses_ema(c))
  return Setup(c, tok, built.config, parts, tx, schedules, mesh, rules, state_sh, frozen_sh, built)
