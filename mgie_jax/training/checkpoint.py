"""Orbax checkpoints: the train state, the grain iterator state and the config, saved together.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames), so a kill
at any moment leaves the last finished checkpoint intact. Restores go straight into the current
mesh's shardings, whatever mesh saved them. A failing restore raises; it never starts fresh.
"""

from __future__ import annotations

import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class RestoreError(RuntimeError):
  pass


class Checkpointer:

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                             enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, data_iter, config: dict, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, abstract_state, data_iter, step: int | None = None):
    """Restore into `abstract_state` (ShapeDtypeStructs carrying the target shardings)."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:
      raise RestoreError(
          f"cannot restore checkpoint step {step} from {self.directory}: {type(e).__name__}: {e}\n"
          "Refusing to start from scratch over an existing run: fix the cause (model or optimizer "
          "config changed? files damaged?) or pass a new --workdir.") from e
    return restored["state"]

  def saved_config(self, step: int) -> dict:
    path = os.path.join(self.directory, str(step), "config", "metadata")
    with open(path) as f:
      return json.load(f)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
