"""Orbax checkpoints: the train state, the grain iterator state and the config, saved together.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames), so a kill
at any moment leaves the last finished checkpoint intact. Restores go straight into the current
mesh's shardings, whatever mesh saved them. A failing restore raises a one-line UserError that
says why (which parameter and config value differ, or which earlier steps are intact); it never
starts fresh. Changing train.ema_decay between runs is not a mismatch: the EMA of the weights
starts from the restored ones, or the saved one is dropped. Paths may be local or any
`etils.epath` location (gs://...). What a run on disk looks like, and its read-only readers, are
in mgie_jax.run.workdir.
"""

from __future__ import annotations

import logging

import grain
import jax
import orbax.checkpoint as ocp

from mgie_jax.run.workdir import check_fits, checkpoint_dir, diagnose, state_metadata
from mgie_jax.training.state import start_ema

log = logging.getLogger(__name__)


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
