"""Train MGIE: the MLLM and the diffusion model jointly, sharded over a device mesh.

  python -m mgie_jax.train --config=configs/tiny.py --workdir=/tmp/mgie_tiny
  python -m mgie_jax.train --config=configs/ipr2pr.py --workdir=DIR --config.train.batch_size=128

Re-running with the same --workdir resumes from its latest checkpoint (model, optimizer, data
iterator); a finished run exits at once. SIGTERM (preemption) on any host saves the same step on
every host and exits 0; a NaN/Inf loss stops without saving. Multi-host: run the same command on
every host; JAX's distributed runtime is initialised from the environment (TPU pods, SLURM, ...)
or from --coordinator_address/--num_processes/--process_id. Mistakes in the config or the inputs
are reported in one line (exit code 2) before anything is built or compiled.
"""

from __future__ import annotations

import logging
import sys

from absl import flags
from ml_collections import config_flags

from mgie_jax.core import cli, errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, logs and samples go here; reused to resume")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host without autodetection)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")
flags.mark_flags_as_required(["config", "workdir"])

log = logging.getLogger("mgie_jax.train")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
  cli.quiet_libraries()     # Orbax, grain and JAX log every file and backend they touch
  # Deferred until the flags have parsed, so that --help and flag mistakes answer at once: JAX,
  # and then the trainer with the data, model and checkpoint stacks (seconds to import).
  import jax

  from mgie_jax.core import parallel, paths
  from mgie_jax.run import workdir as workdir_lib
  from mgie_jax.run.checks import check_training_config
  parallel.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  c = FLAGS.config
  workdir = str(paths.path(FLAGS.workdir))     # local, or gs://... (file:// is local)
  lead = jax.process_index() == 0
  # --- checks before anything is built --------------------------------------------------------
  check_training_config(c, jax.device_count(), jax.process_count())
  if c.data.get("features", ""):
    from data_pipelines.feature_cache import check_cache
    from mgie_jax.run.model import tower_sources
    check_cache(c.data.features, tower_sources(c, workdir))
  if not c.data.dir and not paths.is_local(workdir):
    raise errors.BAD_OPTION(flag="--workdir", detail="the synthetic data is generated under a local workdir",
                            fix="use a local --workdir, or give a built dataset as --config.data.dir")
  total = int(c.train.steps)
  directory = workdir_lib.checkpoint_dir(workdir)
  steps = workdir_lib.saved_steps(directory)
  if c.get("init_from", "") and not steps:      # a resumed fine-tune reads its own checkpoints
    workdir_lib.locate(checkpoint=c.init_from, option="--config.init_from")
  restore_step = c.checkpoint.get("restore_step", None)
  if restore_step is not None and restore_step not in steps:
    raise errors.NO_STEP(directory=directory, step=restore_step, steps=", ".join(map(str, steps)) or "none")
  if steps and restore_step is None and steps[-1] >= total:
    log.info("the run in %s already finished (step %d of %d): nothing to do", workdir, steps[-1], total)
    return
  lock = _lock_run(workdir, lead)
  from mgie_jax.training import trainer
  try:
    code = trainer.train(c, workdir, restore_step, lock)
  finally:
    if lock:
      lock.release()
  if code:
    sys.exit(code)


def _lock_run(workdir, lead):
  """Process 0 takes the run's writer lock for all hosts of this run; every host learns the
  outcome, so a refused run stops everywhere with the same line."""
  from mgie_jax.core import hosts
  from mgie_jax.training.writer_lock import WriterLock
  lock, refused = None, None
  if lead:
    try:
      lock = WriterLock(workdir).acquire()
    except errors.UserError as e:
      refused = e
  if hosts.max_of(int(refused is not None), "run_locked") and refused is None:
    if lock:
      lock.release()
    raise errors.RUN_LOCKED(workdir=workdir, holder="see process 0's message")
  if refused is not None:
    raise refused
  return lock


if __name__ == "__main__":
  cli.run(main)
