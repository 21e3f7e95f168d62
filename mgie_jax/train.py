"""Train MGIE: the MLLM and the diffusion model jointly, sharded over a device mesh.

  python -m mgie_jax.train --config=configs/tiny.py --workdir=/tmp/mgie_tiny
  python -m mgie_jax.train --config=configs/ipr2pr.py --workdir=DIR --config.train.batch_size=128

Re-running with the same --workdir resumes from its latest checkpoint (model, optimizer, data
iterator). SIGTERM (preemption) saves and exits; a NaN/Inf loss stops without saving.
Multi-host: run the same command on every host; JAX's distributed runtime is initialised from
the environment (TPU pods, SLURM, ...) or from --coordinator_address/--num_processes/--process_id.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, logs and samples go here; reused to resume")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host without autodetection)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")
flags.mark_flags_as_required(["config", "workdir"])

log = logging.getLogger("mgie_jax.train")


class Preempted:
  """Set by SIGTERM; checked once per step so the state is saved between steps."""

  def __init__(self):
    self.flag = False
    signal.signal(signal.SIGTERM, self._set)

  def _set(self, *_):
    self.flag = True


def main(argv):
  del argv
  # --- setup ----------------------------------------------------------------------------------
  import jax
  if FLAGS.coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_ID")):
    jax.distributed.initialize()
  from flax import nnx

  from data_pipelines.loader import LoaderConfig, make_loader
  from mgie_jax.training import flops as flops_lib
  from mgie_jax.training.checkpoint import Checkpointer, abstract_with_shardings
  from mgie_jax.training.setup import make_setup, tokenizer_dir
  from mgie_jax.training.step import batch_sharding, jit_train_step

  c = FLAGS.config
  workdir = os.path.abspath(FLAGS.workdir)
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)     # Orbax and grain log every file they touch
  log.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)
  if c.train.batch_size % jax.process_count():
    raise ValueError(f"batch_size {c.train.batch_size} must divide over {jax.process_count()} processes")

  # --- data -----------------------------------------------------------------------------------
  data_dir = c.data.dir
  if not data_dir:
    data_dir = _synthetic_dataset(c, workdir, lead)
  tok_dir = tokenizer_dir(c, workdir)

  # --- model, optimizer, shardings, state ---------------------------------------------------------
  run = make_setup(c, tok_dir)
  mesh, rules, mcfg, parts, tok = run.mesh, run.rules, run.mcfg, run.parts, run.tok
  state_sh, frozen_sh, tx, schedules = run.state_sh, run.frozen_sh, run.tx, run.schedules
  abstract_state = run.abstract_state()

  ckpt = Checkpointer(workdir, every=c.checkpoint.every, keep=c.checkpoint.keep,
                      async_save=c.checkpoint.async_save)
  per_host = c.train.batch_size // jax.process_count()
  loader_cfg = LoaderConfig(data_dir=data_dir, batch_size=per_host, resolution=c.data.resolution,
                            clip_resolution=mcfg.llava.vision.image_size, tokenizer=tok_dir,
                            max_length=c.data.max_length, num_image_tokens=mcfg.llava.num_image_tokens,
                            seed=c.seed, num_threads=c.data.num_threads, worker_count=c.data.worker_count)
  data_iter = make_loader(loader_cfg, jax.process_index(), jax.process_count(), c.data.shards)

  start = ckpt.latest_step()
  if start is not None:
    log.info("resuming from %s step %d", ckpt.directory, start)
    state = ckpt.restore(abstract_state, data_iter)
    frozen = run.frozen()
  else:
    start = 0
    state, frozen = run.new_state()
  run.host_model = None     # the host copy of pretrained weights is no longer needed

  # --- the train step -------------------------------------------------------------------------
  batch_sh = batch_sharding(run)
  batch_abstract = _batch_abstract(per_host * jax.process_count(), c, mcfg, batch_sh, jax)
  jitted = jit_train_step(run, c.data.resolution)
  t0 = time.time()
  with jax.set_mesh(mesh):
    compiled = jitted.lower(abstract_state, abstract_with_shardings(frozen, frozen_sh), batch_abstract).compile()
  log.info("compiled the train step in %.1f s; memory per device: %s", time.time() - t0,
           _memory_report(compiled))
  flops = flops_lib.mgie_flops_per_sample(
      parts.merge(nnx.to_pure_dict(parts.trainable_template), nnx.to_pure_dict(parts.frozen_template)),
      c.data.max_length, c.data.resolution)
  peak = flops_lib.peak_tflops()

  # --- the loop -------------------------------------------------------------------------------
  writer = None
  if lead and c.log.tensorboard:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  preempted = Preempted()
  metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a") if lead else None
  total = c.train.steps * c.train.grad_accum
  config_json = json.loads(c.to_json_best_effort())
  bar = _progress(lead, start, total)
  step, last_log, n_since = start, time.time(), 0
  status = "finished"
  while step < total:
    host = next(data_iter)
    host.pop("key", None)
    batch = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in host.items()}
    state, metrics = compiled(state, frozen, batch)
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
      tflops = sps * flops / jax.device_count() / 1e12
      row = {k: float(v) for k, v in metrics.items()}
      row.update(samples_per_s=sps, tflops_per_device=tflops,
                 lr_mllm=float(schedules["mllm"](step // c.train.grad_accum)),
                 lr_diffusion=float(schedules["diffusion"](step // c.train.grad_accum)))
      if peak:
        row["mfu"] = tflops / peak
      if lead:
        metrics_file.write(json.dumps({"step": step, **row}) + "\n")
        metrics_file.flush()
        bar.set_postfix(loss=f"{row['loss']:.4f}", ins=f"{row['ins']:.4f}", edit=f"{row['edit']:.4f}")
        log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(row.items())))
        if writer:
          for k, v in row.items():
            writer.add_scalar(f"train/{k}", v, step)
      last_log, n_since = time.time(), 0
    if c.log.sample_every and step % c.log.sample_every == 0:
      _write_samples(c, workdir, step, parts, state, frozen, tok, data_dir, mcfg, lead, mesh)
      last_log = time.time()             # keep sampling time out of samples/s
    if preempted.flag or ckpt.manager.reached_preemption(step):
      log.warning("preempted at step %d: saving and exiting", step)
      ckpt.save(step, state, data_iter, config_json, force=True)
      status = "preempted"
      break
    if ckpt.should_save(step):
      ckpt.save(step, state, data_iter, config_json)
  if status == "finished" and ckpt.latest_step() != step:
    ckpt.save(step, state, data_iter, config_json, force=True)
  ckpt.close()
  bar.close()
  if writer:
    writer.close()
  if metrics_file:
    metrics_file.close()
  log.info("%s at step %d; checkpoints in %s", status, step, ckpt.directory)
  if status == "nan":
    sys.exit(1)


def _batch_abstract(batch, c, mcfg, sharding, jax):
  import jax.numpy as jnp
  r, cr, n = c.data.resolution, mcfg.llava.vision.image_size, c.data.max_length
  shapes = {"input_image": ((batch, r, r, 3), jnp.float32), "edited_image": ((batch, r, r, 3), jnp.float32),
            "clip_image": ((batch, cr, cr, 3), jnp.float32), "input_ids": ((batch, n), jnp.int32),
            "labels": ((batch, n), jnp.int32), "attention_mask": ((batch, n), jnp.int32)}
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


def _progress(lead, start, total):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not lead, desc="train", dynamic_ncols=True)


def _synthetic_dataset(c, workdir, lead):
  """Generate and build the synthetic dataset under <workdir>/data once (process 0 writes)."""
  import jax
  from jax.experimental import multihost_utils
  from data_pipelines import synthetic
  from data_pipelines.ipr2pr import build
  src = os.path.join(workdir, "data", "synthetic_source")
  out = os.path.join(workdir, "data", "tfds")
  s = c.data.synthetic
  if lead and not os.path.exists(os.path.join(src, "expressive.json")):
    synthetic.write_dataset(src, s.prompts, s.seeds, s.size, c.seed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("synthetic source written")
  builder = build(src, out, "folder", os.path.join(src, "expressive.json")) if lead else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("synthetic dataset built")
  return str(builder.data_dir if builder else os.path.join(out, "ipr2pr", "folder", "1.0.0"))


def _write_samples(c, workdir, step, parts, state, frozen, tok, data_dir, mcfg, lead, mesh):
  """Edit a few validation images with the current weights and save a captioned PNG grid."""
  import jax
  from data_pipelines.loader import open_source
  from PIL import Image
  import io
  from mgie_jax import inference
  from mgie_jax.diffusion import SamplerConfig
  src = open_source(data_dir, "validation")
  recs = [src[i] for i in range(min(c.log.samples, len(src)))]
  if not recs:
    log.warning("no validation examples: skipping the sample grid")
    return
  images = [Image.open(io.BytesIO(r["input_image"])).convert("RGB") for r in recs]
  instructions = [r["instruction"].decode() for r in recs]
  model = parts.merge(state.params, frozen)
  with jax.set_mesh(mesh):
    out, texts = inference.edit(model, tok, images, instructions, key=jax.random.key(step),
                                resolution=c.data.resolution, steps=c.log.sample_steps,
                                max_new_tokens=c.log.sample_new_tokens)
  if lead:
    ins = [np.asarray(im.resize((c.data.resolution,) * 2)) for im in images]
    grid = inference.sample_grid(ins, list(out), texts, instructions)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    grid.save(os.path.join(workdir, "samples", f"step_{step:07d}.png"))
    log.info("samples at step %d: %s", step, " | ".join(texts))


if __name__ == "__main__":
  app.run(main)
