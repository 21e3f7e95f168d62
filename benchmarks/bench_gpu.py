"""The real-size MGIE on one accelerator: train step at the largest batch that fits, and one edit.

  python benchmarks/bench_gpu.py                                   # a GPU: LLaVA-7B + SD-1.5 shapes
  python benchmarks/bench_gpu.py --config=configs/tiny.py --batches=4,2 --resolution=64 \\
      --steps=2 --new_tokens=4 --repeats=2                          # a dry run of the script on CPU

No weights are read: the model is the full recipe's structure (configs/ipr2pr.py: LLaVA-7B v1 with
CLIP ViT-L/14, the release's edit head, SD-1.5's UNet with 8 input channels and VAE) in its
dtypes (bf16 frozen towers, fp32 master copies and Adam moments for the trained set), initialised
from the seed on the device. Speed does not depend on the values.

Train: for each of --batches, largest first, the trainer's own jitted step (donation, explicit
shardings) is compiled for the config's batch at --seq_len tokens; the first whose compiled
memory fits the device (and that then runs) is timed: median of --repeats steps after a warm-up.
Prints seconds per step, samples/s, tokens/s and MFU (model FLOPs as docs/design.md counts
them, over the chip's dense bf16 peak).

Edit: the pieces `mgie_jax.compile --program=edit` prices (prefill, decode steps with the KV
cache, the [IMG] pass and edit head, VAE encode, S sampler steps of three UNet branches each, VAE
decode), each compiled and run on the device in bf16 and timed; seconds per edit is the sum of
each piece's median time times its count. Stops early, saying what it left out, past --budget_s.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "ipr2pr.py"), "training config")
flags.DEFINE_string("batches", "64,32,16,8,4", "global batch sizes to try, largest first")
flags.DEFINE_integer("seq_len", 384, "token length of the train step (0: config.data.max_length); 384 holds "
                     "a typical IPr2Pr example (256 image tokens + prompt + expressive instruction)")
flags.DEFINE_integer("repeats", 5, "timed calls per measurement (median)")
flags.DEFINE_integer("resolution", 512, "edit: image side")
flags.DEFINE_integer("steps", 100, "edit: sampler steps")
flags.DEFINE_integer("new_tokens", 32, "edit: tokens of the expressive instruction")
flags.DEFINE_float("budget_s", 540.0, "stop starting new measurements after this many seconds")
flags.DEFINE_string("json", "", "also write the numbers here")
FLAGS = flags.FLAGS


def median_time(fn, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn())           # warm-up (and, on first call, allocation)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def concrete(abstract, seed: int = 0):
  """Arrays with the shapes, dtypes and shardings of `abstract`: uniform [-1, 1) floats, ones for
  booleans, zeros for integers (an edit's inputs; the cost does not depend on them)."""
  import jax
  import jax.numpy as jnp

  def make(x, key):
    if jnp.issubdtype(x.dtype, jnp.floating):
      f = lambda: jax.random.uniform(key, x.shape, x.dtype, -1, 1)
    elif x.dtype == jnp.bool_:
      f = lambda: jnp.ones(x.shape, bool)
    else:
      f = lambda: jnp.zeros(x.shape, x.dtype)
    return jax.jit(f, out_shardings=x.sharding)()
  leaves, tree = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
  return jax.tree.unflatten(tree, [make(x, k) for x, k in zip(leaves, keys)])


def train_batch(spec, mcfg, batch: int, seq_len: int, sharding) -> dict:
  """A training batch laid out as the loader makes one: BOS, <im_start>, the image patches,
  <im_end>, text, the 8 visual tokens; the loss on the second half."""
  import jax
  import numpy as np
  rng = np.random.default_rng(0)
  n_img = int(mcfg.num_image_tokens)
  ids = rng.integers(3, 30000, size=(batch, seq_len)).astype(np.int32)
  ids[:, 0] = 1
  ids[:, 2:2 + n_img] = mcfg.llava.image_token_id
  ids[:, -8:] = np.arange(mcfg.img_token_id, mcfg.img_token_id + 8)
  labels = ids.copy()
  labels[:, :seq_len // 2] = -100
  out = {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids)}
  for name, (shape, dtype) in spec.fields(seq_len).items():
    if name not in out:
      out[name] = (rng.uniform(-1, 1, size=(batch,) + shape) if np.issubdtype(dtype, np.floating)
                   else np.ones((batch,) + shape)).astype(dtype)
  return {k: jax.device_put(v, sharding) for k, v in out.items()}


def fits(compiled, device) -> tuple[bool, float]:
  """Whether the compiled program's memory fits the device, and that memory in GiB."""
  m = compiled.memory_analysis()
  if m is None:
    return True, float("nan")
  need = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
          + m.generated_code_size_in_bytes)
  limit = (device.memory_stats() or {}).get("bytes_limit")
  return (limit is None or need <= limit), need / 2**30


def time_train(c, built, t_start: float) -> tuple[dict, object, object]:
  import jax
  from mgie_jax.run.batch import batch_spec
  from mgie_jax.training import flops as flops_lib
  from mgie_jax.training.setup import setup_for
  from mgie_jax.training.step import batch_sharding, jit_train_step
  device = jax.devices()[0]
  run = setup_for(c, None, built, jax.devices())
  seq_len = FLAGS.seq_len or int(c.data.max_length)
  spec = batch_spec(c, run.mcfg)
  sh = batch_sharding(run)
  tried = []
  for batch in [int(b) for b in FLAGS.batches.split(",")]:
    if time.perf_counter() - t_start > FLAGS.budget_s:
      tried.append(dict(batch=batch, skipped="over --budget_s"))
      break
    c.train.batch_size = batch
    t0 = time.perf_counter()
    try:
      with jax.set_mesh(run.mesh):
        step = jit_train_step(run, c.data.resolution).lower(
            run.abstract_state(), run.abstract_frozen(), spec.abstract(batch, sh, seq_len)).compile()
    except jax.errors.JaxRuntimeError as e:
      tried.append(dict(batch=batch, compile_error=str(e).splitlines()[0][:200]))
      continue
    ok, gib = fits(step, device)
    row = dict(batch=batch, seq_len=seq_len, compile_s=round(time.perf_counter() - t0, 1), memory_gib=round(gib, 2))
    if not ok:
      tried.append(dict(row, skipped="compiled memory exceeds the device"))
      continue
    state, frozen = run.new_state()
    b = train_batch(spec, run.mcfg, batch, seq_len, sh)
    try:
      holder = [state]

      def one():
        holder[0], m = step(holder[0], frozen, b)
        return m["loss"]
      seconds = median_time(one, FLAGS.repeats)
    except jax.errors.JaxRuntimeError as e:        # out of memory at run time: try the next batch
      tried.append(dict(row, run_error=str(e).splitlines()[0][:200]))
      del state, frozen, b
      continue
    flops = batch * flops_lib.mgie_flops_per_sample(built.abstract, seq_len, c.data.resolution, spec.text_length,
                                                      bool(spec.features))
    peak = flops_lib.peak_tflops(device)
    row.update(seconds_per_step=seconds, samples_per_s=batch / seconds, tokens_per_s=batch * seq_len / seconds,
               model_tflops_per_step=flops / 1e12, mfu=(flops / seconds / 1e12 / peak) if peak else None)
    tried.append(row)
    return dict(chosen=row, tried=tried), run, holder[0]
  return dict(chosen=None, tried=tried), run, None


def time_edit(c, run, state, t_start: float) -> dict:
  import jax
  import jax.numpy as jnp
  from mgie_jax.inference.edit_aot import edit_pieces
  from mgie_jax.run.model import cast_tree
  from mgie_jax.training.setup import eval_params
  params_abs, frozen_abs, pieces = edit_pieces(
      run.placed, run.mcfg, resolution=FLAGS.resolution, batch=1, new_tokens=FLAGS.new_tokens, steps=FLAGS.steps,
      prompt_length=int(run.mcfg.llava.num_image_tokens) + 64)
  bf16 = jnp.dtype("bfloat16")
  params = cast_tree(eval_params(state), bf16)
  del state
  frozen = cast_tree(run.frozen(), bf16)
  rows = []
  with jax.set_mesh(run.mesh):
    for name, count, fn, inputs in pieces:
      if time.perf_counter() - t_start > FLAGS.budget_s:
        rows.append(dict(piece=name, count=count, skipped="over --budget_s"))
        continue
      t0 = time.perf_counter()
      compiled = jax.jit(fn).lower(params_abs, frozen_abs, *inputs).compile()
      args = concrete(inputs)
      compile_s = time.perf_counter() - t0
      seconds = median_time(lambda: compiled(params, frozen, *args), FLAGS.repeats)
      rows.append(dict(piece=name, count=count, seconds=seconds, compile_s=round(compile_s, 1)))
  out = dict(resolution=FLAGS.resolution, steps=FLAGS.steps, new_tokens=FLAGS.new_tokens, batch=1, pieces=rows)
  if all("seconds" in r for r in rows):
    out["seconds_per_edit"] = sum(r["count"] * r["seconds"] for r in rows)
  return out


def main(argv):
  del argv
  t_start = time.perf_counter()
  import jax
  from mgie_jax.core import cli
  from mgie_jax.run import model as model_lib
  cli.quiet_libraries()
  c = FLAGS.config.unlock()
  # The full recipe's structure with no folder, or a random config's own shapes; seeded on the device.
  built = model_lib.standard_shapes(c) if c.model.init == "pretrained" else model_lib.shapes_only(c)
  dev = jax.devices()[0]
  print(f"device: {len(jax.devices())} x {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  train, run, state = time_train(c, built, t_start)
  for r in train["tried"]:
    print("train try:", {k: v for k, v in r.items()}, flush=True)
  ch = train["chosen"]
  if ch:
    mfu = f"{100 * ch['mfu']:.1f}%" if ch["mfu"] is not None else "n/a (unknown peak)"
    print(f"train step: batch {ch['batch']} x {ch['seq_len']} tokens at {c.data.resolution} px: "
          f"{ch['seconds_per_step']:.3f} s/step, {ch['samples_per_s']:.2f} samples/s, "
          f"{ch['tokens_per_s']:.0f} tokens/s, {ch['model_tflops_per_step']:.1f} TFLOP/step, MFU {mfu}; "
          f"compiled memory {ch['memory_gib']:.1f} GiB", flush=True)
    edit = time_edit(c, run, state, t_start)
  else:
    print("train step: no batch size fit; the edit is timed with the seeded weights", flush=True)
    edit = time_edit(c, run, run.new_state()[0], t_start)
  for r in edit["pieces"]:
    s = f"{1e3 * r['seconds']:9.2f} ms (compile {r['compile_s']:.0f} s)" if "seconds" in r else r["skipped"]
    print(f"  edit piece {r['piece']:32s} x{r['count']:<4d} {s}", flush=True)
  if "seconds_per_edit" in edit:
    print(f"edit: {edit['seconds_per_edit']:.2f} s per {FLAGS.resolution}-px edit, {FLAGS.steps} steps, "
          f"{FLAGS.new_tokens} new tokens", flush=True)
  print(f"total wall {time.perf_counter() - t_start:.0f} s", flush=True)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(dict(device=dev.device_kind, train=train, edit=edit), f, indent=1)


if __name__ == "__main__":
  app.run(main)
