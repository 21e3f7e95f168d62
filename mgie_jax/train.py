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

import json
import logging
import os
import signal
import sys
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from mgie_jax import cli, errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, logs and samples go here; reused to resume")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host without autodetection)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")
flags.mark_flags_as_required(["config", "workdir"])
# Orbax's default barriers are device collectives. Run from its async-save thread on several hosts,
# they interleave with the train step's own collectives differently on each host: a hang, or a
# collective mismatch. The distributed client's barriers do not touch the devices.
from orbax.checkpoint._src.multihost import multihost as _orbax_multihost  # noqa: E402  (defines the flag)
FLAGS.set_default(_orbax_multihost.EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER.name, True)

log = logging.getLogger("mgie_jax.train")


class Preempted:
  """Set by SIGTERM or Ctrl-C (SIGINT) on this host; `agreed(step)` makes every host stop at the
  same step, which is saved. A second Ctrl-C aborts at once: Orbax writes a step under a temporary
  name and renames it when complete, so the last finished checkpoint stays intact."""

  def __init__(self, on_abort=None):
    self.flag = False
    self.interrupted = False       # Ctrl-C: exit 130 after saving, as interrupted commands do
    self.on_abort = on_abort
    signal.signal(signal.SIGTERM, self._set)
    signal.signal(signal.SIGINT, self._interrupt)

  def _set(self, *_):
    self.flag = True

  def _interrupt(self, *_):
    if self.interrupted:
      print("second interrupt: aborting without saving; the last finished checkpoint is kept",
            file=sys.stderr, flush=True)
      if self.on_abort:
        self.on_abort()
      os._exit(130)
    self.flag = self.interrupted = True
    print("interrupt: saving at the next step boundary, then exiting (Ctrl-C again aborts without saving)",
          file=sys.stderr, flush=True)

  def agreed(self, step: int, ckpt) -> bool:
    import jax
    local = self.flag or ckpt.manager.reached_preemption(step)
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    # One tiny all-gather per step boundary: every host learns whether any host was told to stop.
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(local))).any())


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
  cli.quiet_libraries()     # Orbax, grain and JAX log every file and backend they touch
  import jax
  from mgie_jax import parallel
  parallel.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from mgie_jax.training import checkpoint as ckpt_lib
  from mgie_jax.training.validate import check_training_config

  from mgie_jax import paths
  c = FLAGS.config
  workdir = str(paths.path(FLAGS.workdir))     # local, or gs://... (file:// is local)
  lead = jax.process_index() == 0
  # --- checks before anything is built --------------------------------------------------------
  check_training_config(c, jax.device_count(), jax.process_count())
  total = int(c.train.steps)
  directory = ckpt_lib.checkpoint_dir(workdir)
  steps = ckpt_lib.saved_steps(directory)
  restore_step = c.checkpoint.get("restore_step", None)
  if restore_step is not None and restore_step not in steps:
    raise errors.NO_STEP(directory=directory, step=restore_step, steps=", ".join(map(str, steps)) or "none")
  if steps and restore_step is None and steps[-1] >= total:
    log.info("the run in %s already finished (step %d of %d): nothing to do", workdir, steps[-1], total)
    return
  lock = _lock_run(workdir, lead)
  try:
    code = run_training(c, workdir, lead, restore_step, lock)
  finally:
    if lock:
      lock.release()
  if code:
    sys.exit(code)


def _lock_run(workdir, lead):
  """Process 0 takes the run's writer lock for all hosts of this run; every host learns the
  outcome, so a refused run stops everywhere with the same line."""
  import jax
  from mgie_jax.training.writer_lock import WriterLock
  lock, refused = None, None
  if lead:
    try:
      lock = WriterLock(workdir).acquire()
    except errors.UserError as e:
      refused = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if np.asarray(multihost_utils.process_allgather(np.int32(refused is not None))).any() and refused is None:
      if lock:
        lock.release()
      raise errors.RUN_LOCKED(workdir=workdir, holder="see process 0's message")
  if refused is not None:
    raise refused
  return lock


def run_training(c, workdir, lead, restore_step, lock=None):
  """Train until c.train.steps or a stop; returns the exit code (0 finished or preempted, 130
  interrupted by Ctrl-C, 1 a NaN loss)."""
  import jax
  from flax import nnx

  from data_pipelines import prepare
  from data_pipelines.loader import LoaderConfig, make_loader
  from mgie_jax.build import tokenizer_dir
  from mgie_jax.training import flops as flops_lib
  from mgie_jax.training.checkpoint import Checkpointer, abstract_with_shardings
  from mgie_jax.training.setup import make_setup
  from mgie_jax.training.step import batch_sharding, jit_train_step

  from mgie_jax import paths
  if lead:
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
  cache = c.get("compile_cache", "auto")
  if jax.process_count() > 1 and jax.devices()[0].platform == "cpu":
    # A CPU executable carries its own process's collectives setup: a host that loads another
    # host's entry from a shared cache runs mismatched collectives (seen as gloo size errors).
    jax.config.update("jax_enable_compilation_cache", False)
    cache = ""
  if cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):   # restarts skip the compiles they
    # already made (a cache named in the environment, e.g. a cluster-wide one, wins)
    cache = str(paths.path(workdir) / "compile_cache") if cache == "auto" else cache
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(c.get("compile_cache_min_seconds", 1.0)))
  log.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)
  from mgie_jax.parallel import cpu_threads_advice
  advice = cpu_threads_advice(jax.devices()[0].platform, jax.local_device_count(), os.cpu_count() or 1, os.environ)
  if advice:
    log.warning(advice)

  # --- data (and the synthetic recipe's VAE) ----------------------------------------------------
  if not c.data.dir and not paths.is_local(workdir):
    raise errors.BAD_OPTION(flag="--workdir", detail="the synthetic data is generated under a local workdir",
                            fix="use a local --workdir, or give a built dataset as --config.data.dir")
  data_dir = c.data.dir or _once(lead, "synthetic dataset", lambda: prepare.synthetic_dataset(workdir, c.data.synthetic, c.seed),
                                 os.path.join(workdir, "data", "tfds", "ipr2pr", "folder", "1.0.0"))
  if c.get("pretrained", {}).get("vae") == "synthetic":
    _once(lead, "synthetic VAE", lambda: prepare.synthetic_vae(workdir, data_dir, c), None)
  tok_dir = tokenizer_dir(c, workdir)

  # --- model, optimizer, shardings, state ---------------------------------------------------------
  run = make_setup(c, tok_dir, workdir=workdir)
  mesh, mcfg, parts, tok = run.mesh, run.mcfg, run.parts, run.tok
  abstract_state = run.abstract_state()
  ckpt = Checkpointer(workdir, every=c.checkpoint.every, keep=c.checkpoint.keep,
                      async_save=c.checkpoint.async_save)
  per_host = c.train.batch_size // jax.process_count()
  loader_cfg = LoaderConfig(data_dir=data_dir, batch_size=per_host, resolution=c.data.resolution,
                            clip_resolution=clip_size(c, mcfg), tokenizer=tok_dir,
                            max_length=c.data.max_length, num_image_tokens=image_tokens(c, mcfg),
                            text_length=c.data.get("text_length", 0), seed=c.seed,
                            num_threads=c.data.num_threads, worker_count=c.data.worker_count)
  data_iter = make_loader(loader_cfg, jax.process_index(), jax.process_count(), c.data.shards)
  config_json = json.loads(c.to_json_best_effort())

  start = restore_step if restore_step is not None else ckpt.latest_step()
  if start is not None:
    if restore_step is not None:
      _set_aside_newer(ckpt, restore_step, lead)
    log.info("resuming from %s step %d", ckpt.directory, start)
    state = ckpt.restore(abstract_state, data_iter, start, config=config_json)
    frozen = run.frozen()
  else:
    start = 0
    state, frozen = run.new_state()

  # --- the train step -------------------------------------------------------------------------
  batch_sh = batch_sharding(run)
  jitted = jit_train_step(run, c.data.resolution)
  frozen_abstract = abstract_with_shardings(frozen, run.frozen_sh)
  template = parts.merge(nnx.to_pure_dict(parts.trainable_template), nnx.to_pure_dict(parts.frozen_template))
  buckets = length_buckets(c)
  compiled, flops = {}, {}     # token length -> compiled step, model FLOPs per sample

  def step_for(length: int):
    """The train step compiled for batches padded to `length` tokens (one per bucket, on first use)."""
    if length not in compiled:
      t0 = time.time()
      with jax.set_mesh(mesh):
        compiled[length] = jitted.lower(abstract_state, frozen_abstract,
                                     _batch_abstract(c.train.batch_size, c, mcfg, batch_sh, length)).compile()
      log.info("compiled the train step for %d tokens in %.1f s; memory per device: %s", length,
               time.time() - t0, _memory_report(compiled[length]))
      flops[length] = flops_lib.mgie_flops_per_sample(template, length, c.data.resolution,
                                                      c.data.get("text_length", 0))
    return compiled[length]

  step_for(buckets[-1])     # the longest first: a batch of any length fits in memory if this does
  if jax.process_count() > 1:
    # Start the loop together: a host still compiling or restoring would time out the others'
    # first collective (CPU collectives give up after 30 s); this barrier waits minutes.
    import orbax.checkpoint as ocp
    ocp.multihost.sync_global_processes("mgie_jax.train: compiled")
  peak = flops_lib.peak_tflops()

  # --- the loop -------------------------------------------------------------------------------
  writer = None
  if lead and c.log.tensorboard:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(str(paths.path(workdir) / "tensorboard"))
  preempted = Preempted(on_abort=lock.release if lock else None)
  metrics_file = paths.Appender(paths.path(workdir) / "metrics.jsonl") if lead else None
  total = int(c.train.steps)
  bar = cli.progress(total, "train", lead, initial=start)
  step, last_log, n_since, warned_no_img = start, time.time(), 0, False
  status = "finished"
  with cli.log_through(cli.interactive(lead)):
    while step < total:
      host = next(data_iter)
      host.pop("key", None)
      length = trim_to_bucket(host, buckets)
      batch = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in host.items()}
      state, metrics = step_for(length)(state, frozen, batch)
      step += 1
      n_since += 1
      loss = float(metrics["loss"])          # one scalar per step: guards every save against NaN
      if not np.isfinite(loss):
        log.error("loss is %s at step %d: stopping without saving; the last good checkpoint is step %s "
                  "in %s", loss, step, ckpt.latest_step(), ckpt.directory)
        status = "nan"
        break
      bar.update(1)
      if step % c.log.every == 0 or step == total:
        dt = time.time() - last_log
        sps = n_since * c.train.batch_size / dt
        tflops = sps * flops[length] / jax.device_count() / 1e12
        row = {k: float(v) for k, v in metrics.items()}
        row.update(samples_per_s=sps, tflops_per_device=tflops,
                   lr_mllm=float(run.schedules["mllm"](step - 1)),
                   lr_diffusion=float(run.schedules["diffusion"](step - 1)))
        if peak:
          row["mfu"] = tflops / peak
        if row.get("no_img") and not warned_no_img:
          log.warning("%d example(s) in this batch have no [IMG0] token: left out of L_edit", row["no_img"])
          warned_no_img = True
        if lead:
          metrics_file.write(json.dumps({"step": step, **row}) + "\n")
          bar.set_postfix(loss=f"{row['loss']:.4f}", ins=f"{row['ins']:.4f}", edit=f"{row['edit']:.4f}")
          log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(row.items())))
          if writer:
            for k, v in row.items():
              writer.add_scalar(f"train/{k}", v, step)
        last_log, n_since = time.time(), 0
      if c.log.sample_every and step % c.log.sample_every == 0:
        _write_samples(c, workdir, step, parts, state, frozen, tok, data_dir, lead, mesh)
        last_log = time.time()             # keep sampling time out of samples/s
      if c.eval.every and step % c.eval.every == 0 and step != total:
        _validate(c, workdir, step, parts, state, frozen, tok, data_dir, lead, mesh, writer)
        last_log = time.time()
      if preempted.agreed(step, ckpt):
        status = "interrupted" if preempted.interrupted else "preempted"
        log.warning("%s at step %d: saving and exiting", status, step)
        ckpt.save(step, state, data_iter, config_json, force=True)
        break
      if ckpt.should_save(step):
        ckpt.save(step, state, data_iter, config_json)
    if status == "finished" and ckpt.latest_step() != step:
      ckpt.save(step, state, data_iter, config_json, force=True)
    ckpt.close()
    if status == "finished" and (c.eval.at_end or c.eval.every):
      _validate(c, workdir, step, parts, state, frozen, tok, data_dir, lead, mesh, writer)
  bar.close()
  if writer:
    writer.close()
  log.info("%s at step %d; checkpoints in %s", status, step, ckpt.directory)
  if status == "nan":
    return 1
  return 130 if status == "interrupted" else 0


def _set_aside_newer(ckpt, step: int, lead: bool):
  """Restoring an earlier step on purpose: newer checkpoints (e.g. a damaged one) are moved to
  checkpoints.superseded/ so that the run continues from `step`; nothing is deleted."""
  newer = [s for s in ckpt.all_steps() if s > step]
  if not newer or not lead:
    return
  aside = ckpt.directory.parent / "checkpoints.superseded"
  aside.mkdir(parents=True, exist_ok=True)
  for s in newer:
    (ckpt.directory / str(s)).rename(aside / f"{s}.{int(time.time())}")
  ckpt.manager.reload()
  log.warning("restoring step %d: moved newer steps %s to %s", step, newer, aside)


def clip_size(c, mcfg) -> int:
  return mcfg.llava.vision.image_size if hasattr(mcfg, "llava") else c.model.vision.image_size


def image_tokens(c, mcfg) -> int:
  if hasattr(mcfg, "llava"):
    return mcfg.llava.num_image_tokens
  return (c.model.vision.image_size // c.model.vision.patch_size) ** 2


def length_buckets(c) -> list:
  """The token lengths batches are padded to: config.data.length_buckets, up to max_length."""
  n = int(c.data.max_length)
  return sorted({int(b) for b in (c.data.get("length_buckets", None) or ()) if 0 < int(b) < n} | {n})


def trim_to_bucket(host: dict, buckets: list) -> int:
  """Cut the token arrays of a host batch to the shortest bucket that holds its longest example
  (padding only: same losses), the same bucket on every host; returns the length."""
  if len(buckets) == 1 or "attention_mask" not in host:
    return buckets[-1]
  import jax
  longest = int(np.max(np.sum(host["attention_mask"], axis=1)))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
  length = next(b for b in buckets if b >= longest)
  for k in ("input_ids", "labels", "attention_mask"):
    host[k] = host[k][:, :length]
  return length


def _batch_abstract(batch, c, mcfg, sharding, length=None):
  import jax
  import jax.numpy as jnp
  r, cr, n = c.data.resolution, clip_size(c, mcfg), length or c.data.max_length
  shapes = {"input_image": ((batch, r, r, 3), jnp.float32), "edited_image": ((batch, r, r, 3), jnp.float32),
            "clip_image": ((batch, cr, cr, 3), jnp.float32), "input_ids": ((batch, n), jnp.int32),
            "labels": ((batch, n), jnp.int32), "attention_mask": ((batch, n), jnp.int32)}
  if c.data.get("text_length", 0):
    t = c.data.text_length
    shapes.update(instruction_ids=((batch, t), jnp.int32), instruction_mask=((batch, t), jnp.int32))
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def _memory_report(compiled) -> str:
  try:
    m = compiled.memory_analysis()
  except Exception as e:  # some backends do not implement it
    return f"unavailable ({type(e).__name__})"
  if m is None:
    return "unavailable"
  gb = lambda b: f"{b / 2**30:.3f} GiB"
  return (f"arguments {gb(m.argument_size_in_bytes)}, outputs {gb(m.output_size_in_bytes)}, "
          f"temporaries {gb(m.temp_size_in_bytes)}, code {gb(m.generated_code_size_in_bytes)}")


def _once(lead, what, make, path):
  """`make()` on process 0 (it writes `path`), the others wait; returns `path`."""
  import jax
  from jax.experimental import multihost_utils
  out = make() if lead else path
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(what)
  return out


def _validate(c, workdir, step, parts, state, frozen, tok, data_dir, lead, mesh, writer):
  """The validation summary: the edits' L1 on c.eval.split against copying the input."""
  from mgie_jax.training.setup import eval_params
  from mgie_jax.training.validation import summary_line, validate
  palette = None
  if not c.data.dir:
    from data_pipelines.synthetic import COLORS as palette
  t0 = time.time()
  v, per_example = validate(parts.merge(eval_params(state), frozen), tok, data_dir, c, step, mesh, palette)
  if lead:
    log.info("%s (%.0f s)", summary_line(c.eval.split, step, v), time.time() - t0)
    from mgie_jax import paths
    paths.Appender(paths.path(workdir) / "eval.jsonl").write(json.dumps({"step": step, "split": c.eval.split, **v}) + "\n")
    # Which edits fail, and what the MLLM wrote for them: the mean hides it.
    rows = paths.path(workdir) / "eval_examples" / f"step_{step:07d}.jsonl"
    rows.parent.mkdir(parents=True, exist_ok=True)
    rows.write_text("".join(json.dumps(r) + "\n" for r in per_example))
    if writer:
      for k, val in v.items():
        writer.add_scalar(f"eval/{k}", val, step)
      writer.flush()


def _write_samples(c, workdir, step, parts, state, frozen, tok, data_dir, lead, mesh):
  """Edit a few validation images with the current weights and save a captioned PNG grid."""
  import jax
  from data_pipelines.loader import open_source
  from mgie_jax import inference
  from mgie_jax.training.setup import eval_params
  from mgie_jax.images import decode_rgb
  src = open_source(data_dir, "validation")
  recs = [src[i] for i in range(min(c.log.samples, len(src)))]
  if not recs:
    log.warning("no validation examples: skipping the sample grid")
    return
  images = [decode_rgb(r["input_image"]) for r in recs]
  instructions = [r["instruction"].decode() for r in recs]
  model = parts.merge(eval_params(state), frozen)
  with jax.set_mesh(mesh):
    out, texts = inference.edit(model, tok, images, instructions, key=jax.random.key(step),
                                resolution=c.data.resolution, steps=c.log.sample_steps,
                                max_new_tokens=c.log.sample_new_tokens)
  if lead:
    ins = [np.asarray(im.resize((c.data.resolution,) * 2)) for im in images]
    grid = inference.sample_grid(ins, list(out), texts, instructions)
    import io
    from mgie_jax import paths
    folder = paths.path(workdir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    grid.save(buf, "PNG")
    (folder / f"step_{step:07d}.png").write_bytes(buf.getvalue())
    log.info("samples at step %d: %s", step, " | ".join(texts))


if __name__ == "__main__":
  cli.run(main)
