"""What training adds to a built, placed model (mgie_jax.run.model): the optimizer, the TrainState's
shardings, and the sharded initial state."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.models.mgie import MGIE, MGIEConfig
from mgie_jax.run import model as model_lib
from mgie_jax.run.workdir import abstract_with_shardings, uses_ema
from mgie_jax.text import LlamaTokenizer
from mgie_jax.training.optim import make_optimizer
from mgie_jax.training.state import TrainState, start_ema, state_shardings


@dataclasses.dataclass
class Setup:
  config: object
  tok: LlamaTokenizer | None
  built: model_lib.Built
  placed: model_lib.Placement
  tx: object
  schedules: dict
  state_sh: TrainState           # of NamedSharding

  @property
  def mcfg(self) -> MGIEConfig:
    return self.built.config

  @property
  def parts(self) -> model_lib.ModelParts:
    return self.placed.parts

  @property
  def mesh(self):
    return self.placed.mesh

  @property
  def rules(self) -> tuple:
    return self.placed.rules

  @property
  def frozen_sh(self) -> dict:
    return self.placed.frozen_sh

  def init_state(self):
    """(TrainState, None) from the seed or the pretrained weights; traceable."""
    c = self.config
    if self.built.plan is None:
      params = model_lib.seeded_split(c, self.built)[0]
    else:                # shapes only (abstract_state); new_state places the loaded values
      params = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), nnx.to_pure_dict(self.parts.trainable_template))
    params = model_lib.cast_tree(params, jnp.float32)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                       rng=jax.random.key_data(jax.random.key(c.seed)),
                       ema=jax.tree.map(jnp.copy, params) if uses_ema(c) else None)
    return state, None

  def abstract_state(self):
    with jax.set_mesh(self.mesh):
      state, _ = jax.eval_shape(self.init_state)
    return abstract_with_shardings(state, self.state_sh)

  def abstract_frozen(self):
    """The frozen towers as ShapeDtypeStructs in the frozen dtype, on their shardings."""
    dtype = jnp.dtype(self.config.model.frozen_dtype)
    return abstract_with_shardings(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
        nnx.to_pure_dict(self.parts.frozen_template)), self.frozen_sh)

  def new_state(self):
    """(TrainState, frozen) at step 0, every array made on (or read straight onto) its sharding."""
    if self.built.plan is not None:
      return self._pretrained_state(), self.frozen()
    with jax.set_mesh(self.mesh):
      state = jax.jit(lambda: self.init_state()[0], out_shardings=self.state_sh)()
    return state, self.frozen()

  def _pretrained_state(self):
    """Trainable parameters from their files straight onto their shardings (fp32 master copies),
    then the optimizer state built on the devices."""
    params = model_lib.trainable_params(self.config, self.built, self.placed, jnp.float32)
    with jax.set_mesh(self.mesh):
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_sh.opt_state)(params)
      rng = jax.device_put(jax.random.key_data(jax.random.key(self.config.seed)), self.state_sh.rng)
      step = jax.device_put(jnp.zeros((), jnp.int32), self.state_sh.step)
      ema = start_ema(params, self.state_sh.ema) if uses_ema(self.config) else None
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng, ema=ema)

  def frozen(self):
    """Frozen towers are not checkpointed: rebuilt from their source (seeded init or pretrained)."""
    return model_lib.frozen_params(self.config, self.built, self.placed)

  def model(self, params, frozen) -> MGIE:
    return self.parts.merge(params, frozen)


def eval_params(state) -> dict:
  """The parameters to sample, validate and export with: the EMA when training keeps one."""
  return state.params if state.ema is None else state.ema


def make_setup(c, tokenizer_dir: str, devices=None, workdir=None) -> Setup:
  tok = LlamaTokenizer.from_pretrained(tokenizer_dir)
  return setup_for(c, tok, model_lib.build(c, tok, workdir), devices)


def setup_for(c, tok, built: model_lib.Built, devices=None) -> Setup:
  """The Setup of an already built model structure (mgie_jax.compile: no tokenizer, no files)."""
  placed = model_lib.place(c, built, devices)
  tx, schedules = make_optimizer(c.train, nnx.to_pure_dict(placed.parts.trainable_template))
  return Setup(c, tok, built, placed, tx, schedules, state_shardings(placed, tx, ema=uses_ema(c)))
