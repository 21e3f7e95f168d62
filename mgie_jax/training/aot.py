"""Ahead-of-time compiles of the train step for any devices, a TPU slice included (libtpu compiles
for a slice without one): the compiler's memory per device, its cost-model step time, and the
samples/s and MFU they imply. `mgie_jax.compile` is the command; `Slice` there names the slices.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time

import jax
from jax.experimental import topologies

from mgie_jax.core.compiled import compiler_numbers
from mgie_jax.models.layers import unrolled_layers
from mgie_jax.run.batch import batch_spec
from mgie_jax.training import flops as flops_lib
from mgie_jax.training.setup import setup_for
from mgie_jax.training.step import batch_sharding, jit_train_step


def target_devices(topology: str, s=None):
  """The devices of slice `s` (named `topology`, a mgie_jax.compile.Slice), or this machine's for 'local'."""
  if topology == "local":
    return jax.devices()
  # libtpu looks for a TPU VM's metadata unless told what it is; no TPU is used.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # compiling only: several may run at once
  desc = topologies.get_topology_desc(platform="tpu", topology_name=s.topology, chip_config_name=s.chip_config,
                                      chips_per_host_bounds=s.host_bounds, num_slices=1)
  return list(desc.devices)


def compile_train_step(c, built, devices, seq_len: int, unroll: bool = False) -> dict:
  """Lower and compile the train step for `devices`; the compiler's numbers as a dict."""
  run = setup_for(c, None, built, devices)
  state = run.abstract_state()
  frozen = run.abstract_frozen()
  batch = int(c.train.batch_size)
  spec = batch_spec(c, run.mcfg)       # the trainer's batch, the loader's arrays
  inputs = spec.abstract(batch, batch_sharding(run), seq_len)
  t0 = time.time()
  with unrolled_layers() if unroll else contextlib.nullcontext():
    lowered = jit_train_step(run, c.data.resolution).lower(state, frozen, inputs)
  t1 = time.time()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    oom = hbm_overflow(str(e))
    if oom is None:
      raise
    return dict(devices=len(devices), device_kind=devices[0].device_kind, batch=batch, seq_len=seq_len,
                resolution=int(c.data.resolution), unrolled=bool(unroll), lower_s=round(t1 - t0, 1),
                compile_s=round(time.time() - t1, 1), does_not_fit=oom)
  t2 = time.time()
  numbers = compiler_numbers(compiled)
  model_flops = batch * flops_lib.mgie_flops_per_sample(built.abstract, seq_len, c.data.resolution,
                                                        spec.text_length, bool(spec.features))
  out = dict(devices=len(devices), device_kind=devices[0].device_kind, batch=batch, seq_len=seq_len,
             resolution=int(c.data.resolution), unrolled=bool(unroll), lower_s=round(t1 - t0, 1),
             compile_s=round(t2 - t1, 1), model_tflops_per_step=model_flops / 1e12,
             compiled_tflops_per_device=numbers["flops"] / 1e12)
  if "argument_gib" in numbers:
    out.update({k: numbers[k] for k in ("argument_gib", "output_gib", "alias_gib", "temp_gib", "code_gib")})
    out["total_gib"] = (out["argument_gib"] + out["output_gib"] - out["alias_gib"] + out["temp_gib"]
                        + out["code_gib"])
  if "cost_model_s" in numbers:
    # libtpu prices a few custom calls at -1 s each (a program of one sharded matmul comes out at
    # -0.99998 s): compiler_numbers adds those back and says how many there were.
    out.update(cost_model_raw_s=numbers["cost_model_raw_s"], uncosted_ops=numbers["uncosted_ops"],
               cost_model_step_s=numbers["cost_model_s"])
  return out


def hbm_overflow(message: str) -> dict | None:
  """What XLA:TPU says when a program does not fit in HBM ("Ran out of memory in memory space hbm"),
  as numbers: used and capacity GiB, and the breakdown it prints; None for any other error."""
  found = re.search(r"Used ([\d.]+)G of ([\d.]+)G hbm", message)
  if "memory space hbm" not in message or not found:
    return None
  out = {"used_gib": float(found.group(1)), "capacity_gib": float(found.group(2))}
  for name in ("program", "arguments", "HLO temp"):
    m = re.search(rf"\n\s*{name}\s+([\d.]+)([MG])", message)
    if m:
      out[f"{name.replace(' ', '_').lower()}_gib"] = float(m.group(1)) / (1024 if m.group(2) == "M" else 1)
  return out


def estimates(result: dict, sl, peak_tflops: float | None, examples: int = 0, epochs: float = 1.0) -> dict:
  """Samples/s and MFU implied by the cost model's step time (when it gave a positive one), and
  the hours and chip-hours of `examples` x `epochs` at that rate."""
  out = {}
  if sl is not None:
    out["hbm_gib"] = sl.hbm_gib
  if "does_not_fit" in result:
    return out
  if peak_tflops:      # the compiled FLOPs at the chip's peak: no estimate can be below this
    out["compute_floor_s"] = result["compiled_tflops_per_device"] / peak_tflops
  step = result.get("cost_model_step_s", 0.0)
  if step > 0 and result["unrolled"]:     # scanned layers are counted once: no rate from that
    out["samples_per_s"] = result["batch"] / step
    if peak_tflops:
      out["mfu"] = result["model_tflops_per_step"] / result["devices"] / step / peak_tflops
    if examples:
      out.update(examples=int(examples), epochs=float(epochs),
                 steps=math.ceil(examples * epochs / result["batch"]))
      out["hours"] = out["steps"] * step / 3600
      out["chip_hours"] = out["hours"] * result["devices"]
  return out


def report(r: dict, topology: str) -> str:
  lines = [f"{topology}: {r['devices']} x {r['device_kind']}, global batch {r['batch']}, seq {r['seq_len']}, "
           f"{r['resolution']} px{' (layers unrolled)' if r['unrolled'] else ''}",
           f"  compile: lower {r['lower_s']:.0f} s, compile {r['compile_s']:.0f} s"]
  if "does_not_fit" in r:
    o = r["does_not_fit"]
    parts = ", ".join(f"{k[:-4].replace('_', ' ')} {v:.2f}" for k, v in o.items() if k not in ("used_gib", "capacity_gib"))
    lines.append(f"  DOES NOT FIT: XLA needs {o['used_gib']:.2f} of {o['capacity_gib']:.2f} GiB HBM per chip ({parts}); "
                 "try a smaller batch, remat=full, a larger slice"
                 + (", or the scanned program (without --unroll: what training runs; unrolled layers let XLA "
                    "prefetch more weights)" if r["unrolled"] else ""))
    return "\n".join(lines)
  if "total_gib" in r:
    hbm = f" of {r['hbm_gib']:.0f} GiB HBM ({'fits' if r['total_gib'] <= r['hbm_gib'] else 'DOES NOT FIT'})" \
        if "hbm_gib" in r else ""
    lines.append(f"  memory per device: {r['total_gib']:.2f} GiB{hbm} = arguments {r['argument_gib']:.2f} "
                 f"+ temporaries {r['temp_gib']:.2f} + outputs {r['output_gib']:.2f} - donated {r['alias_gib']:.2f} "
                 f"+ code {r['code_gib']:.2f}")
  lines.append(f"  FLOPs per step: model {r['model_tflops_per_step']:.1f} TFLOP (analytic + traced towers); "
               f"compiled {r['compiled_tflops_per_device'] * r['devices']:.1f} TFLOP over all devices"
               + ("" if r["unrolled"] else " (loop bodies counted once: use --unroll)"))
  if "cost_model_step_s" in r and not r["unrolled"]:
    lines.append("  compiler estimate: none (scanned layers are counted once; pass --unroll)")
  elif "cost_model_step_s" in r:
    line = f"  compiler estimate: step {r['cost_model_step_s']:.4f} s"
    if "samples_per_s" in r:
      line += f", {r['samples_per_s']:.1f} samples/s"
    if "mfu" in r:
      line += f", MFU {100 * r['mfu']:.1f}%"
    if "compute_floor_s" in r:
      line += f" (compiled FLOPs at peak: {r['compute_floor_s']:.4f} s)"
    lines.append(line + f" (XLA cost model, not a measurement; {r['uncosted_ops']} uncosted ops added back)")
    if "chip_hours" in r:
      lines.append(f"  price: {r['examples']:,} examples x {r['epochs']:g} epochs = {r['steps']:,} steps: "
                   f"{r['hours']:.1f} h on {r['devices']} chips, {r['chip_hours']:.0f} chip-hours (at the cost model's rate)")
  return "\n".join(lines)
