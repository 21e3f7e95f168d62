"""The training loop, read top to bottom: data, model and state, the compiled step, the loop with
its logging, samples, validation, preemption and checkpoints. `mgie_jax.train` checks the
command line and the config, takes the run's writer lock, then calls `train`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import flags
from flax import nnx
from tensorboardX import SummaryWriter

from data_pipelines import feature_cache, prepare
from data_pipelines.loader import LoaderConfig, make_loader, open_source
from data_pipelines.synthetic import COLORS
from mgie_jax.core import cli, errors, hosts, paths
from mgie_jax.core.fingerprint import tree_fingerprint
from mgie_jax.core.images import decode_rgb
from mgie_jax.core.parallel import cpu_threads_advice
from mgie_jax.inference import pipeline as inference
from mgie_jax.run import workdir as workdir_lib
from mgie_jax.run.batch import TOKENS, batch_spec, bucket_for, length_buckets
from mgie_jax.run.compile_cache import use_compile_cache
from mgie_jax.run.model import FEATURE_TOWERS, subtree, tokenizer_dir
from mgie_jax.training import flops as flops_lib
from mgie_jax.training.checkpoint import Checkpointer
from mgie_jax.training.setup import Setup, eval_params, make_setup
from mgie_jax.training.state import start_ema
from mgie_jax.training.step import batch_sharding, jit_train_step
from mgie_jax.training.validation import summary_line, validate

log = logging.getLogger("mgie_jax.train")


@dataclasses.dataclass
class Run:
  """What every part of the loop needs to know about this run."""
  config: object
  workdir: str
  lead: bool                     # process 0: the one that writes logs, samples and metrics
  data_dir: str
  setup: Setup
  writer: object = None          # tensorboardX SummaryWriter (process 0, config.log.tensorboard)

  @property
  def palette(self) -> dict | None:
    """The synthetic data's colours (its edit/keep accuracies); None for a built dataset."""
    return None if self.config.data.dir else COLORS

  def path(self, *parts):
    return paths.path(self.workdir).joinpath(*parts)

  def model(self, state, frozen):
    """The model to sample and validate with (the EMA's weights when training keeps one)."""
    return self.setup.parts.merge(eval_params(state), frozen)


def train(c, workdir: str, restore_step: int | None = None, lock=None) -> int:
  """Train until c.train.steps or a stop; returns the exit code (0 finished or preempted, 130
  interrupted by Ctrl-C, 1 a NaN loss)."""
  # Orbax's default barriers are device collectives. Run from its async-save thread on several
  # hosts, they interleave with the train step's own collectives differently on each host: a hang
  # or a collective mismatch. The distributed client's barriers do not touch the devices.
  flags.FLAGS.set_default("experimental_orbax_use_distributed_barrier", True)
  lead = jax.process_index() == 0
  if lead:
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
  use_compile_cache(c, workdir)
  log.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)
  advice = cpu_threads_advice(jax.devices()[0].platform, jax.local_device_count(), os.cpu_count() or 1, os.environ)
  if advice:
    log.warning(advice)

  # --- data (and the synthetic recipe's VAE) ----------------------------------------------------
  data_dir = c.data.dir or _once(lead, "synthetic dataset", lambda: prepare.synthetic_dataset(workdir, c.data.synthetic, c.seed),
                                 os.path.join(workdir, "data", "tfds", "ipr2pr", "folder", "1.0.0"))
  if c.get("pretrained", {}).get("vae") == "synthetic":
    _once(lead, "synthetic VAE", lambda: prepare.synthetic_vae(workdir, data_dir, c), None)
  tok_dir = tokenizer_dir(c, workdir)

  # --- model, optimizer, shardings, state ---------------------------------------------------------
  setup = make_setup(c, tok_dir, workdir=workdir)
  run = Run(c, workdir, lead, data_dir, setup)
  abstract_state = setup.abstract_state()
  ckpt = Checkpointer(workdir, every=c.checkpoint.every, keep=c.checkpoint.keep,
                      async_save=c.checkpoint.async_save)
  spec = batch_spec(c, setup.mcfg)
  loader_cfg = LoaderConfig(data_dir=data_dir, batch_size=c.train.batch_size // jax.process_count(),
                            tokenizer=tok_dir, seed=c.seed, num_threads=c.data.num_threads,
                            worker_count=c.data.worker_count, features=c.data.get("features", ""),
                            expressive=c.data.get("expressive", ""),
                            **spec.loader_options())
  data_iter = make_loader(loader_cfg, jax.process_index(), jax.process_count(), c.data.shards)
  config_json = json.loads(c.to_json_best_effort())

  start = restore_step if restore_step is not None else ckpt.latest_step()
  if start is not None:
    if restore_step is not None:
      _set_aside_newer(ckpt, restore_step, lead)
    log.info("resuming from %s step %d", ckpt.directory, start)
    state = ckpt.restore(abstract_state, data_iter, start, config=config_json)
    frozen = setup.frozen()
  else:
    start = 0
    state, frozen = setup.new_state()
    if c.get("init_from", ""):
      state = start_from_checkpoint(c, setup, state)
  if c.data.get("features", ""):
    check_features_fingerprint(c, setup, frozen)

  # --- the train step, compiled once per length bucket ------------------------------------------
  batch_sh = batch_sharding(setup)
  jitted = jit_train_step(setup, c.data.resolution)
  frozen_abstract = setup.abstract_frozen()
  template = setup.parts.merge(nnx.to_pure_dict(setup.parts.trainable_template),
                              nnx.to_pure_dict(setup.parts.frozen_template))
  buckets = length_buckets(c)
  compiled, flops = {}, {}     # token length -> compiled step, model FLOPs per sample

  def step_for(length: int):
    if length not in compiled:
      t0 = time.time()
      with jax.set_mesh(setup.mesh):
        compiled[length] = jitted.lower(abstract_state, frozen_abstract,
                                        spec.abstract(c.train.batch_size, batch_sh, length)).compile()
      log.info("compiled the train step for %d tokens in %.1f s; memory per device: %s", length,
               time.time() - t0, memory_report(compiled[length]))
      flops[length] = flops_lib.mgie_flops_per_sample(template, length, c.data.resolution, spec.text_length,
                                                       bool(spec.features))
      # Run it together (every host compiles a bucket at the same step): a host still compiling or
      # restoring would time out the others' first collective (CPU collectives set up within 30 s
      # or give up); this barrier waits minutes.
      hosts.barrier("compiled")
    return compiled[length]

  step_for(buckets[-1])     # the longest first: a batch of any length fits in memory if this does
  peak = flops_lib.peak_tflops()

  # --- the loop -------------------------------------------------------------------------------
  if lead and c.log.tensorboard:
    run.writer = SummaryWriter(str(run.path("tensorboard")))
  preempted = Preempted(on_abort=lock.release if lock else None)
  metrics_file = paths.Appender(run.path("metrics.jsonl")) if lead else None
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
                   lr_mllm=float(setup.schedules["mllm"](step - 1)),
                   lr_diffusion=float(setup.schedules["diffusion"](step - 1)))
        if peak:
          row["mfu"] = tflops / peak
        if row.get("no_img") and not warned_no_img:
          log.warning("%d example(s) in this batch have no [IMG0] token: left out of L_edit", row["no_img"])
          warned_no_img = True
        if lead:
          metrics_file.write(json.dumps({"step": step, **row}) + "\n")
          bar.set_postfix(loss=f"{row['loss']:.4f}", ins=f"{row['ins']:.4f}", edit=f"{row['edit']:.4f}")
          log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(row.items())))
          if run.writer:
            for k, v in row.items():
              run.writer.add_scalar(f"train/{k}", v, step)
        last_log, n_since = time.time(), 0
      if c.log.sample_every and step % c.log.sample_every == 0:
        write_samples(run, step, state, frozen)
        last_log = time.time()             # keep sampling time out of samples/s
      if c.eval.every and step % c.eval.every == 0 and step != total:
        run_validation(run, step, state, frozen)
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
      run_validation(run, step, state, frozen)
  bar.close()
  if run.writer:
    run.writer.close()
  log.info("%s at step %d; checkpoints in %s", status, step, ckpt.directory)
  if status == "nan":
    return 1
  return 130 if status == "interrupted" else 0


# --- the parts the loop calls ---------------------------------------------------------------------

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
    local = self.flag or ckpt.manager.reached_preemption(step)
    return hosts.max_of(int(local), "stop") > 0    # any host told to stop stops them all


def start_from_checkpoint(c, setup: Setup, state):
  """Fine-tuning: the trained parameters of checkpoint `c.init_from` (its EMA when that run kept
  one, as its readers do) with this run's fresh optimizer state, step 0 and data iterator. The log
  names their fingerprint (mgie_jax.core.fingerprint), to compare with the source's."""
  source, step = workdir_lib.locate(checkpoint=c.init_from, option="--config.init_from")
  key = workdir_lib.inference_key(workdir_lib.saved_config(source, step))
  params = workdir_lib.restore_params(source, step, setup.parts, setup.state_sh.params, "--config.init_from", key)
  with jax.set_mesh(setup.mesh):
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_sh.opt_state)(params)
    ema = start_ema(params, setup.state_sh.ema) if state.ema is not None else None
  state = state.replace(params=params, opt_state=opt_state, ema=ema)
  log.info("starting from %s (%s, fingerprint %s): fresh optimizer and data iterator", c.init_from, key,
           tree_fingerprint(state.params))
  return state


def check_features_fingerprint(c, setup: Setup, frozen: dict) -> None:
  """The cache must hold the outputs of these very towers: compared once their weights are loaded
  (before anything compiles), since the config alone cannot tell re-trained weights in the same folder."""
  meta = feature_cache.read_meta(c.data.features)
  mine = feature_cache.towers_fingerprint(subtree(frozen, FEATURE_TOWERS), setup.mcfg, c.data.resolution)
  if meta.fingerprint != mine:
    raise errors.FEATURES_STALE(path=c.data.features, what=f"by towers with fingerprint {meta.fingerprint}; "
                                f"the configured VAE and CLIP weights give {mine}")


def _once(lead, what, make, path):
  """`make()` on process 0 (it writes `path`), the others wait; returns `path`."""
  out = make() if lead else path
  hosts.barrier(what)
  return out


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


def trim_to_bucket(host: dict, buckets: list) -> int:
  """Cut the token arrays of a host batch to the shortest bucket that holds its longest example
  (padding only: same losses), the same bucket on every host; returns the length."""
  if len(buckets) == 1 or "attention_mask" not in host:
    return buckets[-1]
  longest = int(np.max(np.sum(host["attention_mask"], axis=1)))
  longest = hosts.max_of(longest, "longest")
  length = bucket_for(longest, buckets)
  for k in TOKENS:
    host[k] = host[k][:, :length]
  return length


def memory_report(compiled) -> str:
  try:
    m = compiled.memory_analysis()
  except Exception as e:  # some backends do not implement it
    return f"unavailable ({type(e).__name__})"
  if m is None:
    return "unavailable"
  gb = lambda b: f"{b / 2**30:.3f} GiB"
  return (f"arguments {gb(m.argument_size_in_bytes)}, outputs {gb(m.output_size_in_bytes)}, "
          f"temporaries {gb(m.temp_size_in_bytes)}, code {gb(m.generated_code_size_in_bytes)}")


def run_validation(run: Run, step: int, state, frozen) -> None:
  """The validation summary: the edits' L1 on c.eval.split against copying the input."""
  c = run.config
  t0 = time.time()
  v, per_example = validate(run.model(state, frozen), run.setup.tok, run.data_dir, c, step, run.setup.mesh,
                            run.palette)
  if not run.lead:
    return
  log.info("%s (%.0f s)", summary_line(c.eval.split, step, v), time.time() - t0)
  paths.Appender(run.path("eval.jsonl")).write(json.dumps({"step": step, "split": c.eval.split, **v}) + "\n")
  # Which edits fail, and what the MLLM wrote for them: the mean hides it.
  rows = run.path("eval_examples", f"step_{step:07d}.jsonl")
  rows.parent.mkdir(parents=True, exist_ok=True)
  rows.write_text("".join(json.dumps(r) + "\n" for r in per_example))
  if run.writer:
    for k, val in v.items():
      run.writer.add_scalar(f"eval/{k}", val, step)
    run.writer.flush()


def write_samples(run: Run, step: int, state, frozen) -> None:
  """Edit a few validation images with the current weights and save a captioned PNG grid."""
  c = run.config
  src = open_source(run.data_dir, "validation")
  recs = [src[i] for i in range(min(c.log.samples, len(src)))]
  if not recs:
    log.warning("no validation examples: skipping the sample grid")
    return
  images = [decode_rgb(r["input_image"]) for r in recs]
  instructions = [r["instruction"].decode() for r in recs]
  with jax.set_mesh(run.setup.mesh):
    out, texts = inference.edit(run.model(state, frozen), run.setup.tok, images, instructions,
                                key=jax.random.key(step), resolution=c.data.resolution,
                                steps=c.log.sample_steps, max_new_tokens=c.log.sample_new_tokens)
  if not run.lead:
    return
  ins = [np.asarray(im.resize((c.data.resolution,) * 2)) for im in images]
  grid = inference.sample_grid(ins, list(out), texts, instructions)
  folder = run.path("samples")
  folder.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  grid.save(buf, "PNG")
  (folder / f"step_{step:07d}.png").write_bytes(buf.getvalue())
  log.info("samples at step %d: %s", step, " | ".join(texts))
