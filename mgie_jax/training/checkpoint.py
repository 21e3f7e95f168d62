"""Orbax checkpoints: the train state, the grain iterator state and the config, saved together.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames), so a kill
at any moment leaves the last finished checkpoint intact. Restores go straight into the current
mesh's shardings, whatever mesh saved them. A failing restore raises a one-line UserError that
says why (which parameter and config value differ, or which earlier steps are intact); it never
starts fresh. Changing train.ema_decay between runs is not a mismatch: the EMA of the weights
starts from the restored ones, or the saved one is dropped. Paths may be local or any
`etils.epath` location (gs://...).
"""

from __future__ import annotations

import json
import logging

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from mgie_jax import errors
from mgie_jax.training.state import start_ema

log = logging.getLogger(__name__)


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


def state_metadata(directory, step: int):
  """The saved state's tree of ArrayMetadata (shapes and dtypes), read without the arrays."""
  meta = ocp.PyTreeCheckpointer().metadata(epath.Path(directory) / str(step) / "state")
  return meta.item_metadata.tree


class Checkpointer:

  def __init__(self, workdir, *, every: int, keep: int, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                             enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, data_iter, config: dict, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, abstract_state, data_iter, step: int | None = None, *, config: dict | None = None,
              option: str = "--config.checkpoint.restore_step={step}"):
    """Restore into `abstract_state` (ShapeDtypeStructs carrying the target shardings).

    `config` (the current run's, as JSON) lets a mismatch name the config values that differ;
    `option` is how the calling command selects a step, for the message.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    target = _as_saved_ema(self.directory, step, abstract_state)
    mismatch = check_fits(self.directory, step, target, config)
    if mismatch is not None:    # before Orbax reads any array: a failed read is slow and noisy
      raise mismatch
    args = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:
      raise diagnose(self.directory, step, target, config, option, e) from e
    return _with_wanted_ema(restored["state"], abstract_state, step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _saved_ema(directory, step: int) -> bool | None:
  """Whether checkpoint `step` holds an EMA of the weights (None: its metadata cannot be read)."""
  try:
    return bool(state_metadata(directory, step).get("ema"))
  except Exception:
    return None


def _as_saved_ema(directory, step: int, abstract):
  """The restore target: `abstract` with or without the EMA as the checkpoint has it, so that
  turning train.ema_decay on or off between runs resumes instead of failing."""
  if not hasattr(abstract, "ema"):
    return abstract
  saved = _saved_ema(directory, step)
  if saved and abstract.ema is None:
    return abstract.replace(ema=abstract.params)     # read it, then drop it
  if saved is False and abstract.ema is not None:
    return abstract.replace(ema=None)
  return abstract


def _with_wanted_ema(state, abstract, step: int):
  if not hasattr(abstract, "ema") or (state.ema is None) == (abstract.ema is None):
    return state
  if abstract.ema is None:
    log.info("checkpoint step %d keeps an EMA of the weights; train.ema_decay is 0, so it is dropped", step)
    return state.replace(ema=None)
  log.info("checkpoint step %d has no EMA of the weights: it starts from the restored ones", step)
  return state.replace(ema=start_ema(state.params, jax.tree.map(lambda a: a.sharding, abstract.ema)))


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


def read_config_or_none(directory, step: int) -> dict | None:
  try:
    return read_config(directory, step)
  except Exception:
    return None


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
