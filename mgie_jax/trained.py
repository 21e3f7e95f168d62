"""A trained MGIE for inference, evaluation and export.

Reads a training workdir (or one checkpoint folder) without writing to it: the run's saved
config, the model structure built from it (mgie_jax.build), the frozen towers from their source,
and only the trained parameters from the Orbax checkpoint: no optimizer moments (they would
double the memory of a 7B run) and no data-iterator state.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mgie_jax import build as build_lib
from mgie_jax import errors, parallel
from mgie_jax.models.mgie import MGIE
from mgie_jax.text import LlamaTokenizer
from mgie_jax.training import checkpoint as ckpt_lib
from mgie_jax.training.state import inference_key


@dataclasses.dataclass
class Trained:
  model: MGIE
  tok: LlamaTokenizer
  config: ml_collections.ConfigDict
  step: int
  workdir: epath.Path
  mesh: jax.sharding.Mesh
  params: dict                 # the trained parameters (pure dict, fp32), as restored
  built: build_lib.Built

  @property
  def pretrained(self) -> bool:
    return self.config.model.init == "pretrained"


def locate(workdir: str | None = None, checkpoint: str | None = None, step: int | None = None,
           option: str = "--checkpoint") -> tuple[epath.Path, int]:
  """(workdir, step) of a finished checkpoint, from a workdir (latest or `step`) or a checkpoint
  folder `<workdir>/checkpoints/<step>`. Raises UserError when there is none."""
  if bool(workdir) == bool(checkpoint):
    raise errors.CHOOSE_CHECKPOINT()
  if checkpoint:
    path = epath.Path(str(checkpoint).rstrip("/"))
    if not path.name.isdigit() or path.parent.name != "checkpoints":
      raise errors.BAD_OPTION(flag=option, detail=f"{checkpoint} is not a checkpoint folder",
                              fix="give <workdir>/checkpoints/<step>")
    workdir, step = path.parent.parent, int(path.name)
  workdir = epath.Path(workdir)
  directory = ckpt_lib.checkpoint_dir(workdir)
  steps = ckpt_lib.saved_steps(directory)
  if not steps:
    raise errors.NO_CHECKPOINT(directory=directory, option=option)
  if step is None:
    return workdir, steps[-1]
  if step not in steps:
    raise errors.NO_STEP(directory=directory, step=step, steps=", ".join(map(str, steps)))
  return workdir, step


def saved_config(workdir, step: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(ckpt_lib.read_config(ckpt_lib.checkpoint_dir(workdir), step))


def load(workdir, step: int, *, devices=None, mesh: dict | None = None,
         option: str = "--checkpoint=<workdir>/checkpoints/{step}") -> Trained:
  """The model of checkpoint `step` of `workdir`, placed on a mesh of `devices` (default: all,
  FSDP over them), parameters only."""
  c = saved_config(workdir, step)
  c.mesh = mesh or dict(data=1, fsdp=-1, tensor=1)
  tok = LlamaTokenizer.from_pretrained(build_lib.tokenizer_dir(c, str(workdir)))
  built = build_lib.build(c, tok, workdir)
  mesh_, parts, param_sh, frozen_sh = _placement(c, built, devices)
  params = restore_params(workdir, step, parts, param_sh, option, key=inference_key(c))
  frozen = build_lib.frozen_params(c, built, parts, frozen_sh, mesh_)
  model = parts.merge(params, frozen)
  return Trained(model, tok, c, step, epath.Path(workdir), mesh_, params, built)


def from_config(c, tok, *, devices=None, workdir=None):
  """A model straight from a config's pretrained folders (e.g. MGIE's released mllm.pt / unet.pt
  on stock LLaVA and SD), every tensor placed from its file onto a mesh of `devices`; no
  checkpoint. Returns (model, mesh)."""
  from mgie_jax.parallel import place_tree
  built = build_lib.build(c, tok, workdir)
  if built.plan is None:
    raise ValueError("from_config needs a pretrained config (config.model.init='pretrained')")
  mesh_, parts, param_sh, frozen_sh = _placement(c, built, devices)
  import jax.numpy as jnp
  params = place_tree(built.plan.loaders, nnx.to_pure_dict(parts.trainable_template), param_sh,
                      jnp.dtype(c.model.frozen_dtype))
  frozen = build_lib.frozen_params(c, built, parts, frozen_sh, mesh_)
  return parts.merge(params, frozen), mesh_


def _placement(c, built, devices):
  """(mesh, trainable/frozen parts, their shardings) of a built model under the config's rules."""
  mesh_ = parallel.make_mesh(**dict(c.mesh), devices=devices)
  rules = tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in c.rules)
  parts = build_lib.split_model(built.abstract, c.trainable)
  param_sh = nnx.to_pure_dict(parallel.state_shardings(parts.trainable_template, mesh_, rules))
  frozen_sh = nnx.to_pure_dict(parallel.state_shardings(parts.frozen_template, mesh_, rules))
  return mesh_, parts, param_sh, frozen_sh


def restore_params(workdir, step: int, parts, shardings: dict, option: str, key: str = "params") -> dict:
  """Only `state.params` (or `state.ema`) of a checkpoint, straight into `shardings` (fp32)."""
  import jax.numpy as jnp
  template = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.float32),
                          nnx.to_pure_dict(parts.trainable_template))
  item = {key: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 template, shardings)}
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), item)
  directory = ckpt_lib.checkpoint_dir(workdir)
  mismatch = ckpt_lib.check_fits(directory, step, item, None)
  if mismatch is not None:
    raise mismatch
  try:
    out = ocp.PyTreeCheckpointer().restore(
        directory / str(step) / "state",
        args=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True))
  except Exception as e:
    raise ckpt_lib.diagnose(directory, step, item, None, option, e) from e
  return out[key]
