"""What training and inference both build from a config: tokenizer, model structure, optimizer,
shardings, and the (sharded) initial or restored state."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax import parallel
from mgie_jax.models.mgie import MGIE, MGIEConfig
from mgie_jax.text import LlamaTokenizer
from mgie_jax.training import model as model_lib
from mgie_jax.training.checkpoint import abstract_with_shardings
from mgie_jax.training.optim import make_optimizer
from mgie_jax.training.state import (ModelParts, TrainState, cast_tree, split_model, state_shardings,
                                     trainable_filter)


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
  host_model: MGIE | None

  def init_state(self):
    """(TrainState, frozen) from the seed or the pretrained weights; traceable."""
    c = self.config
    if self.host_model is None:
      model = MGIE(self.mcfg, rngs=nnx.Rngs(c.seed))
      _, trainable, frozen = nnx.split(model, trainable_filter(c.trainable), ...)
      params, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
    else:
      params = nnx.to_pure_dict(self.parts.trainable_template)
      frozen = nnx.to_pure_dict(self.parts.frozen_template)
    params = cast_tree(params, jnp.float32)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                       rng=jax.random.key_data(jax.random.key(c.seed)))
    return state, cast_tree(frozen, jnp.dtype(c.model.frozen_dtype))

  def abstract_state(self):
    with jax.set_mesh(self.mesh):
      state, _ = jax.eval_shape(self.init_state)
    return abstract_with_shardings(state, self.state_sh)

  def new_state(self):
    with jax.set_mesh(self.mesh):
      if self.host_model is None:
        return jax.jit(self.init_state, out_shardings=(self.state_sh, self.frozen_sh))()
      frozen = self.frozen()
      return jax.jit(lambda: self.init_state()[0], out_shardings=self.state_sh)(), frozen

  def frozen(self):
    """Frozen towers are not checkpointed: rebuilt from their source (seeded init or pretrained)."""
    if self.host_model is None:
      with jax.set_mesh(self.mesh):
        return jax.jit(lambda: self.init_state()[1], out_shardings=self.frozen_sh)()
    frozen = cast_tree(nnx.to_pure_dict(self.parts.frozen_template), jnp.dtype(self.config.model.frozen_dtype))
    return jax.device_put(frozen, self.frozen_sh)

  def model(self, params, frozen) -> MGIE:
    return self.parts.merge(params, frozen)


def make_setup(c, tokenizer_dir: str, devices=None) -> Setup:
  tok = LlamaTokenizer.from_pretrained(tokenizer_dir)
  mesh = parallel.make_mesh(**dict(c.mesh), devices=devices)
  rules = tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in c.rules)
  if c.model.init == "random":
    mcfg = model_lib.random_config(c, tok)
    host_model = None
    abstract = nnx.eval_shape(lambda: MGIE(mcfg, rngs=nnx.Rngs(c.seed)))
  else:
    host_model = model_lib.load_pretrained(c, tok)
    mcfg, abstract = host_model.config, host_model
  parts = split_model(abstract, c.trainable)
  tx, schedules = make_optimizer(c.train, nnx.to_pure_dict(parts.trainable_template))
  state_sh, frozen_sh = state_shardings(parts, tx, mesh, rules)
  return Setup(c, tok, mcfg, parts, tx, schedules, mesh, rules, state_sh, frozen_sh, host_model)


def tokenizer_dir(c, workdir: str) -> str:
  """The tokenizer folder a config names, or the synthetic one generated under the workdir."""
  if c.data.tokenizer:
    return c.data.tokenizer
  pretrained = c.get("pretrained", None)
  if pretrained is not None and pretrained.get("llava"):
    return pretrained.llava
  return os.path.join(workdir, "data", "synthetic_source", "tokenizer")
