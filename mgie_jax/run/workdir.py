"""A run on disk, read in one place: its layout, the config it saved, the steps present, and its
trained parameters (the EMA when it kept one), restored sharded or read one module at a time.

  <workdir>/checkpoints/<step>/{state,data,config}   Orbax: train state, grain iterator, config JSON
  <workdir>/writer.lock/                             the live writer's claim (mgie_jax.training.writer_lock)
  <workdir>/metrics.jsonl, eval.jsonl, eval_examples/, samples/, tensorboard/, compile_cache/
  <workdir>/data/                                    the tiny recipe's synthetic dataset, tokenizer and VAE

Readers never write: resume (mgie_jax.training.checkpoint restores the whole state with the
same checks), `edit`, `evaluate` and `export` read parameters only (no optimizer moments, which
would double a 7B run's memory, and no data-iterator state). Frozen towers are not saved: they
are rebuilt from their source by mgie_jax.run.model.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mgie_jax.core import errors
from mgie_jax.models import lora as lora_lib
from mgie_jax.models.mgie import MGIE
from mgie_jax.run import model as model_lib
from mgie_jax.text import LlamaTokenizer

# --- layout, steps, saved config -------------------------------------------------------------------

def checkpoint_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def saved_steps(directory) -> list[int]:
  """Finished checkpoint steps under `directory`, newest last, without creating anything."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as m:
    return sorted(m.all_steps())


def read_config(directory, step: int) -> dict:
  return json.loads((epath.Path(directory) / str(step) / "config" / "metadata").read_text())


def read_config_or_none(directory, step: int) -> dict | None:
  try:
    return read_config(directory, step)
  except Exception:
    return None


def saved_config(workdir, step: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(read_config(checkpoint_dir(workdir), step))


def state_metadata(directory, step: int):
  """The saved state's tree of ArrayMetadata (shapes and dtypes), read without the arrays."""
  meta = ocp.PyTreeCheckpointer().metadata(epath.Path(directory) / str(step) / "state")
  return meta.item_metadata.tree


def uses_ema(c) -> bool:
  return float(c.train.get("ema_decay", 0.0)) > 0


def inference_key(c) -> str:
  """Which saved weights a run's readers use: the EMA when it kept one (it sampled and validated with it)."""
  return "ema" if uses_ema(c) else "params"


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
  directory = checkpoint_dir(workdir)
  steps = saved_steps(directory)
  if not steps:
    raise errors.NO_CHECKPOINT(directory=directory, option=option)
  if step is None:
    return workdir, steps[-1]
  if step not in steps:
    raise errors.NO_STEP(directory=directory, step=step, steps=", ".join(map(str, steps)))
  return workdir, step


# --- why a checkpoint does not fit, in one line ---------------------------------------------------

def check_fits(directory, step: int, abstract, config: dict | None) -> errors.UserError | None:
  """A UserError naming the parameters (and config values) that differ between checkpoint
  `step` and `abstract`, from the checkpoint's metadata alone; None when they fit (or when the
  metadata cannot be read: then the restore itself reports the damage)."""
  try:
    saved = state_metadata(directory, step)
  except Exception:
    return None
  diffs = tree_differences(saved, abstract)
  if not diffs:
    return None
  detail = "; ".join(diffs[:2]) + (f" (+{len(diffs) - 2} more)" if len(diffs) > 2 else "")
  changed = config_differences(read_config_or_none(directory, step), config)
  fix = (f"the run was saved with {changed}: restore with those values, " if changed else
         "restore with the config the run was saved with, ")
  return errors.CHECKPOINT_MISMATCH(step=step, detail=detail,
                                    fix=fix + "or pass a new --workdir to start another run")


def diagnose(directory, step: int, abstract, config: dict | None, option: str,
             error: Exception) -> errors.UserError:
  """Why a restore failed, in one line: shapes that differ (and the config values behind them),
  or a damaged checkpoint (and the intact earlier steps)."""
  mismatch = check_fits(directory, step, abstract, config)
  if mismatch is not None:
    return mismatch
  earlier = [s for s in saved_steps(directory) if s < step and _readable(directory, s)]
  first = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
  if earlier:
    fix = (f"intact earlier steps: {', '.join(map(str, reversed(earlier)))}; restore one with "
           f"{option.format(step=earlier[-1])}, or pass a new --workdir")
  else:
    fix = "no earlier step is intact: pass a new --workdir to start again"
  return errors.CHECKPOINT_DAMAGED(step=step, directory=directory, detail=first[:200], fix=fix)


def _readable(directory, step: int) -> bool:
  try:
    state_metadata(directory, step)
    read_config(directory, step)
    return True
  except Exception:
    return False


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaves(tree) -> dict:
  """{dotted path: leaf with a shape} of any pytree (a TrainState or a checkpoint's metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {".".join(_key_name(k) for k in p): v for p, v in leaves if hasattr(v, "shape")}


def tree_differences(saved, abstract) -> list[str]:
  """Parameter paths whose shapes differ between a checkpoint's metadata and the target state."""
  want, have = _leaves(abstract), _leaves(saved)
  roots = {k.split(".")[0] for k in want}          # a partial restore compares its own part only
  have = {k: v for k, v in have.items() if k.split(".")[0] in roots}
  out = []
  params_first = lambda k: (not k.startswith("params."), k)
  for k in sorted(set(want) | set(have), key=params_first):
    if k not in have:
      out.append(f"{k} is missing in the checkpoint")
    elif k not in want:
      out.append(f"{k} is in the checkpoint but not in this model")
    elif tuple(have[k].shape) != tuple(want[k].shape):
      out.append(f"{k} has shape {tuple(have[k].shape)} in the checkpoint, {tuple(want[k].shape)} here")
  return out


def config_differences(saved: dict | None, current: dict | None,
                       sections=("model", "trainable", "pretrained", "train.grad_accum")) -> str:
  """`key = saved` for config values that differ between a saved run and this one."""
  if not saved or not current:
    return ""
  a, b = _flat_config(saved), _flat_config(current)
  keys = [k for k in sorted(set(a) | set(b)) if any(k == s or k.startswith(s + ".") for s in sections)]
  diffs = [f"{k}={a.get(k)!r} (now {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]
  return ", ".join(diffs[:4]) + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")


def _flat_config(cfg, prefix="") -> dict:
  out = {}
  for k, v in cfg.items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# --- trained parameters, sharded ------------------------------------------------------------------

def restore_params(workdir, step: int, parts: model_lib.ModelParts, shardings: dict, option: str,
                   key: str = "params") -> dict:
  """Only `state.params` (or `state.ema`) of a checkpoint, straight into `shardings` (fp32)."""
  template = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.float32),
                          nnx.to_pure_dict(parts.trainable_template))
  item = {key: abstract_with_shardings(template, shardings)}
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), item)
  directory = checkpoint_dir(workdir)
  mismatch = check_fits(directory, step, item, None)
  if mismatch is not None:
    raise mismatch
  try:
    out = ocp.PyTreeCheckpointer().restore(
        directory / str(step) / "state",
        args=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True))
  except Exception as e:
    raise diagnose(directory, step, item, None, option, e) from e
  return out[key]


@dataclasses.dataclass
class Trained:
  """A trained model ready for inference: merged, placed on `mesh`."""
  model: MGIE
  tok: LlamaTokenizer
  config: ml_collections.ConfigDict
  step: int
  workdir: epath.Path
  mesh: jax.sharding.Mesh
  params: dict                 # the trained parameters (pure dict, fp32), as restored
  built: model_lib.Built

  @property
  def pretrained(self) -> bool:
    return self.config.model.init == "pretrained"


def load(workdir, step: int, *, devices=None, mesh: dict | None = None,
         option: str = "--checkpoint=<workdir>/checkpoints/{step}") -> Trained:
  """The model of checkpoint `step` of `workdir`, placed on a mesh of `devices` (default: all,
  FSDP over them), parameters only."""
  c = saved_config(workdir, step)
  c.mesh = mesh or dict(data=1, fsdp=-1, tensor=1)
  tok = LlamaTokenizer.from_pretrained(model_lib.tokenizer_dir(c, str(workdir)))
  built = model_lib.build(c, tok, workdir)
  placed = model_lib.place(c, built, devices)
  params = restore_params(workdir, step, placed.parts, placed.trainable_sh, option, key=inference_key(c))
  model = placed.parts.merge(params, model_lib.frozen_params(c, built, placed))
  return Trained(model, tok, c, step, epath.Path(workdir), placed.mesh, params, built)


def from_config(c, tok, *, devices=None, workdir=None):
  """A model straight from a config's pretrained folders (e.g. MGIE's released mllm.pt / unet.pt
  on stock LLaVA and SD), every tensor placed from its file onto a mesh of `devices`; no
  checkpoint. Returns (model, mesh)."""
  built = model_lib.build(c, tok, workdir)
  if built.plan is None:
    raise ValueError("from_config needs a pretrained config (config.model.init='pretrained')")
  placed = model_lib.place(c, built, devices)
  params = model_lib.trainable_params(c, built, placed, jnp.dtype(c.model.frozen_dtype))
  return placed.parts.merge(params, model_lib.frozen_params(c, built, placed)), placed.mesh


def load_release(recipe, pretrained, dtype: str = "bfloat16", *, devices=None):
  """A pretrained MGIE (e.g. the released mllm.pt / unet.pt on stock LLaVA and SD) built with
  the training `recipe` it follows, from the local folders in `pretrained` (llava, vision_tower,
  sd, mllm_pt, unet_pt). Returns (model, tok, mesh)."""
  tc = ml_collections.ConfigDict(recipe.to_dict())
  tc.model.dtype = tc.model.frozen_dtype = dtype
  for k in ("llava", "vision_tower", "sd", "mllm_pt", "unet_pt"):
    tc.pretrained[k] = pretrained[k]
  tc.mesh = dict(data=1, fsdp=-1, tensor=1)
  tok = LlamaTokenizer.from_pretrained(pretrained["llava"])
  model, mesh = from_config(tc, tok, devices=devices)
  return model, tok, mesh


# --- trained parameters, one module at a time (export) --------------------------------------------

class TrainedSource:
  """Every parameter of checkpoint `step` of `workdir`, in our layout, read when asked: trained
  ones from the checkpoint one top-level module at a time (numpy, no device), frozen ones from
  where the run took them (pretrained files one tensor at a time, or the seeded initialisation
  of a small model), so an export never holds the model twice. What convert.writers reads.

  A run with LoRA adapters is seen merged: `abstract` and `model_config` are the model without
  adapters and an adapted layer's kernel is W + (alpha / r) A B; `adapters` names the adapted
  layers (dotted path -> scaling) and `lora` the run's LoRA config, for the adapter-only format."""

  def __init__(self, workdir, step: int):
    self.workdir, self.step = str(workdir), step
    self.config = c = saved_config(workdir, step)
    self.tok = LlamaTokenizer.from_pretrained(model_lib.tokenizer_dir(c, self.workdir))
    self.built = model_lib.build(c, self.tok, self.workdir)
    self.parts = model_lib.split_model(self.built.abstract, c.trainable)
    self.trainable = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(self.parts.trainable_template)}
    self.key = inference_key(c)
    self.sd_folder = model_lib.pretrained(c, "sd")      # its text encoder and tokenizer are copied
    self._cache: dict = {}
    self._seeded = None
    self._shapes = nnx.to_pure_dict(nnx.state(self.built.abstract))
    self.lora = getattr(self.built.config, "lora", lora_lib.LoraConfig())
    self.adapters = {p: l.scaling for p, l in lora_lib.adapted_layers(self.built.abstract).items()}
    self._merged = None
    if self.adapters:      # the structure the PyTorch-side formats describe: no adapters
      cfg = dataclasses.replace(self.built.config, lora=lora_lib.LoraConfig())
      self._merged = (cfg, nnx.eval_shape(lambda: self.built.cls(cfg, rngs=nnx.Rngs(0))))

  @property
  def model_config(self):
    return self._merged[0] if self._merged else self.built.config

  @property
  def abstract(self):
    return self._merged[1] if self._merged else self.built.abstract

  def _adapted(self, path: str) -> str | None:
    """The adapted layer whose kernel `path` is, if any."""
    layer = path[:-len(".kernel")] if path.endswith(".kernel") else None
    return layer if layer in self.adapters else None

  def restore_module(self, top: str) -> dict:
    """The trained parameters of one top-level module, as numpy (fp32), cached until `release`."""
    if top not in self._cache:
      directory = checkpoint_dir(self.workdir)
      meta = state_metadata(directory, self.step)[self.key][top]
      item = {self.key: {top: jax.tree.map(lambda m: np.zeros((), np.float32), meta,
                                           is_leaf=lambda x: hasattr(x, "shape"))}}
      args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
      out = ocp.PyTreeCheckpointer().restore(directory / str(self.step) / "state",
                                             args=ocp.args.PyTreeRestore(item, restore_args=args,
                                                                         partial_restore=True))
      self._cache[top] = out[self.key][top]
    return self._cache[top]

  def release(self):
    self._cache.clear()

  def _frozen(self, path: str) -> np.ndarray:
    top = path.split(".")[0]
    if self.built.plan is not None:
      return np.asarray(self.built.plan.loaders[path].full())
    if top in self.built.loaded:
      return _get(nnx.to_pure_dict(nnx.state(self.built.loaded[top])), path.split(".")[1:])
    if self._seeded is None:     # a small random-init model: its frozen towers are the seeded init
      self._seeded = jax.tree.map(np.asarray, model_lib.seeded_split(self.config, self.built)[1])
    return _get(self._seeded, path.split("."))

  def get(self, path: str) -> np.ndarray:
    """A parameter by our dotted path, from the checkpoint if trained, else from its source (an
    adapted kernel merged with its adapter)."""
    layer = self._adapted(path)
    if layer:
      return lora_lib.merged_kernel(self.raw(path), self.raw(f"{layer}.lora_a"), self.raw(f"{layer}.lora_b"),
                                    self.adapters[layer])
    return self.raw(path)

  def raw(self, path: str) -> np.ndarray:
    """A parameter as stored (an adapted kernel without its adapter; the factors themselves)."""
    if path in self.trainable:
      return np.asarray(_get(self.restore_module(path.split(".")[0]), path.split(".")[1:]))
    return self._frozen(path)

  def layers(self, path: str, n: int):
    """The slices of a parameter stacked over layers; a frozen one read one layer at a time."""
    layer = self._adapted(path)
    if path not in self.trainable and self.built.plan is not None and self.built.plan.loaders[path].layer:
      loader = self.built.plan.loaders[path]
      if layer:
        a, b = self.raw(f"{layer}.lora_a"), self.raw(f"{layer}.lora_b")
        return (lora_lib.merged_kernel(loader.layer(i), a[i], b[i], self.adapters[layer]) for i in range(n))
      return (np.asarray(loader.layer(i)) for i in range(n))
    arr = self.get(path)
    return (arr[i] for i in range(arr.shape[0]))

  def shape(self, path: str) -> tuple:
    return tuple(_get(self._shapes, path.split(".")).shape)


def _get(tree, keys):
  for k in keys:
    tree = tree[int(k)] if isinstance(tree, (list, tuple)) else tree[k if k in tree else int(k)]
  return tree
