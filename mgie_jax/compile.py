"""Compile the train step ahead of time for a TPU slice, on any machine, without weights or TPUs,
and print the compiler's memory and cost estimates (what a user reads to choose a slice).

  pip install -e ".[tpu]"          # libtpu from PyPI: the TPU compiler, no TPU needed
  python -m mgie_jax.compile --config=configs/ipr2pr.py --topology=v5p-8
  python -m mgie_jax.compile --config=configs/ipr2pr.py --topology=v5e-16 \\
      --config.train.batch_size=128 --seq_len=384 --unroll
  python -m mgie_jax.compile --config=configs/tiny.py --topology=local     # this machine's devices

With the config's pretrained folders empty, the towers take their standard shapes (LLaVA-7B v1,
CLIP ViT-L/14, SD-1.5); given, their configs are read (no tensor is). Memory is per device, from
XLA's buffer assignment. FLOPs and step time are XLA's cost-model estimates, not measurements;
XLA counts a loop body once, so pass --unroll for them (layer stacks traced unrolled: the same
math, a longer compile). MFU = the model's FLOPs per step (mgie_jax.training.flops) / devices /
estimated step time / the chip's peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time

from absl import flags
from ml_collections import config_flags

from mgie_jax import cli, errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
flags.DEFINE_string("topology", "v5p-8", "a TPU slice (v4-8, v5p-8, v5e-16, v6e-8, ... see TOPOLOGIES) or 'local'")
flags.DEFINE_integer("seq_len", 0, "token length to compile for (0: config.data.max_length)")
flags.DEFINE_bool("unroll", False, "trace layer stacks unrolled so the cost model counts every layer")
flags.DEFINE_string("json", "", "also write the numbers to this JSON file")
flags.mark_flags_as_required(["config"])

log = logging.getLogger("mgie_jax.compile")


@dataclasses.dataclass(frozen=True)
class Slice:
  topology: str             # libtpu's name: <chip>:<chips per dimension>
  chip_config: str          # "megacore": one JAX device per chip (v4, v5p)
  host_bounds: tuple
  hbm_gib: float            # per device
  peak_tflops: float        # dense bf16, per device


_V4, _V5P, _V5E, _V6E = (("megacore", (2, 2, 1), 32, 275.0), ("megacore", (2, 2, 1), 95, 459.0),
                         ("default", (2, 2, 1), 16, 197.0), ("default", (2, 2, 1), 32, 918.0))
# Names as Cloud TPU spells slices: v4/v5p count TensorCores (2 per chip), v5e/v6e count chips.
TOPOLOGIES = {
    "v4-8": Slice("v4:2x2x1", *_V4), "v4-16": Slice("v4:2x2x2", *_V4), "v4-32": Slice("v4:2x2x4", *_V4),
    "v5p-8": Slice("v5:2x2x1", *_V5P), "v5p-16": Slice("v5:2x2x2", *_V5P),
    "v5p-32": Slice("v5:2x2x4", *_V5P), "v5p-64": Slice("v5:2x4x4", *_V5P),
    "v5e-4": Slice("v5e:2x2", *_V5E), "v5e-8": Slice("v5e:2x4", *_V5E), "v5e-16": Slice("v5e:4x4", *_V5E),
    "v5e-32": Slice("v5e:4x8", *_V5E), "v6e-4": Slice("v6e:2x2", *_V6E), "v6e-8": Slice("v6e:2x4", *_V6E),
    "v6e-16": Slice("v6e:4x4", *_V6E),
}


# Custom calls that libtpu's cost model prices at -1 s each (found by compiling single ops).
UNCOSTED_CALLS = ("ConcatBitcast", "ZeroCrop")


def target_devices(topology: str):
  """(devices, Slice | None) for a slice name, or this machine's devices for 'local'."""
  import jax
  if topology == "local":
    return jax.devices(), None
  from jax.experimental import topologies
  # libtpu looks for a TPU VM's metadata unless told what it is; no TPU is used.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # compiling only: several may run at once
  s = TOPOLOGIES[topology]
  desc = topologies.get_topology_desc(platform="tpu", topology_name=s.topology, chip_config_name=s.chip_config,
                                      chips_per_host_bounds=s.host_bounds, num_slices=1)
  return list(desc.devices), s


def abstract_batch(run, batch: int, seq_len: int, resolution: int, clip_resolution: int, text_length: int = 0):
  """The loader's batch as shapes on the batch sharding (mgie_jax.train feeds these keys)."""
  import jax
  import jax.numpy as jnp
  from mgie_jax.training.step import batch_sharding
  sh = batch_sharding(run)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct((batch,) + shape, dtype, sharding=sh)
  out = {"input_image": spec((resolution, resolution, 3), jnp.float32),
         "edited_image": spec((resolution, resolution, 3), jnp.float32)}
  if text_length:
    out.update(instruction_ids=spec((text_length,), jnp.int32), instruction_mask=spec((text_length,), jnp.int32))
  else:
    out.update(clip_image=spec((clip_resolution, clip_resolution, 3), jnp.float32),
               input_ids=spec((seq_len,), jnp.int32), labels=spec((seq_len,), jnp.int32),
               attention_mask=spec((seq_len,), jnp.int32))
  return out


def compile_train_step(c, built, devices, seq_len: int, unroll: bool = False) -> dict:
  """Lower and compile the train step for `devices`; the compiler's numbers as a dict."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from mgie_jax import build as build_lib
  from mgie_jax.models.layers import unrolled_layers
  from mgie_jax.training import flops as flops_lib
  from mgie_jax.training.checkpoint import abstract_with_shardings
  from mgie_jax.training.setup import setup_for
  from mgie_jax.training.step import jit_train_step

  run = setup_for(c, None, built, devices)
  state = run.abstract_state()
  dtype = jnp.dtype(c.model.frozen_dtype)
  frozen = abstract_with_shardings(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
      nnx.to_pure_dict(run.parts.frozen_template)), run.frozen_sh)
  batch = int(c.train.batch_size)
  clip_res = getattr(getattr(run.mcfg, "llava", None), "vision", None)
  inputs = abstract_batch(run, batch, seq_len, c.data.resolution, clip_res.image_size if clip_res else 224,
                          int(c.data.get("text_length", 0) or 0) if build_lib.model_kind(c) == "ip2p" else 0)
  t0 = time.time()
  with unrolled_layers() if unroll else contextlib.nullcontext():
    lowered = jit_train_step(run, c.data.resolution).lower(state, frozen, inputs)
  t1 = time.time()
  compiled = lowered.compile()
  t2 = time.time()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  model_flops = batch * flops_lib.mgie_flops_per_sample(built.abstract, seq_len, c.data.resolution,
                                                        int(c.data.get("text_length", 0) or 0))
  out = dict(devices=len(devices), device_kind=devices[0].device_kind, batch=batch, seq_len=seq_len,
             resolution=int(c.data.resolution), unrolled=bool(unroll), lower_s=round(t1 - t0, 1),
             compile_s=round(t2 - t1, 1), model_tflops_per_step=model_flops / 1e12,
             compiled_tflops_per_device=float(cost.get("flops", 0.0)) / 1e12)
  if mem is not None:
    gib = 2.0 ** 30
    out.update(argument_gib=mem.argument_size_in_bytes / gib, output_gib=mem.output_size_in_bytes / gib,
               alias_gib=mem.alias_size_in_bytes / gib, temp_gib=mem.temp_size_in_bytes / gib,
               code_gib=mem.generated_code_size_in_bytes / gib)
    out["total_gib"] = (out["argument_gib"] + out["output_gib"] - out["alias_gib"] + out["temp_gib"]
                        + out["code_gib"])
  if "optimal_seconds" in cost:
    # libtpu's cost model has no cost for a few custom calls and counts each as -1 s (a program
    # of one sharded matmul comes out at -0.99998 s): add those back, and say how many there were.
    text = compiled.as_text() or ""
    uncosted = sum(text.count(f'custom_call_target="{t}"') for t in UNCOSTED_CALLS)
    out.update(cost_model_raw_s=float(cost["optimal_seconds"]), uncosted_ops=uncosted,
               cost_model_step_s=float(cost["optimal_seconds"]) + uncosted)
  return out


def estimates(result: dict, sl: Slice | None, peak_tflops: float | None) -> dict:
  """Samples/s and MFU implied by the cost model's step time (when it gave a positive one)."""
  out = {}
  if sl is not None:
    out["hbm_gib"] = sl.hbm_gib
  if peak_tflops:      # the compiled FLOPs at the chip's peak: no estimate can be below this
    out["compute_floor_s"] = result["compiled_tflops_per_device"] / peak_tflops
  step = result.get("cost_model_step_s", 0.0)
  if step > 0 and result["unrolled"]:     # scanned layers are counted once: no rate from that
    out["samples_per_s"] = result["batch"] / step
    if peak_tflops:
      out["mfu"] = result["model_tflops_per_step"] / result["devices"] / step / peak_tflops
  return out


def report(r: dict, topology: str) -> str:
  lines = [f"{topology}: {r['devices']} x {r['device_kind']}, global batch {r['batch']}, seq {r['seq_len']}, "
           f"{r['resolution']} px{' (layers unrolled)' if r['unrolled'] else ''}",
           f"  compile: lower {r['lower_s']:.0f} s, compile {r['compile_s']:.0f} s"]
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
  return "\n".join(lines)


def check(c, topology: str) -> None:
  """The mistakes that need no compiler: unknown slice, missing libtpu, a bad length (the mesh and
  batch are checked once the slice's device count is known)."""
  if topology != "local" and topology not in TOPOLOGIES:
    raise errors.BAD_OPTION(flag="--topology", detail=f"unknown slice {topology!r}",
                            fix=f"use local or one of {', '.join(TOPOLOGIES)}")
  if topology != "local":
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
      raise errors.BAD_OPTION(flag="--topology", detail="compiling for TPU needs libtpu",
                              fix='pip install -e ".[tpu]" (no TPU needed), or use --topology=local')
  if FLAGS.seq_len < 0:
    raise errors.BAD_OPTION(flag="--seq_len", detail=str(FLAGS.seq_len), fix="use 0 (max_length) or a length")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
  cli.quiet_libraries()
  c, topology = FLAGS.config, FLAGS.topology
  check(c, topology)
  if topology != "local":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")   # compile for the slice; run nothing on a TPU
  import jax
  from mgie_jax import build as build_lib
  devices, sl = target_devices(topology)
  from mgie_jax.training.validate import check_batch
  check_batch(c, len(devices), 1)
  seq_len = FLAGS.seq_len or int(c.data.max_length)
  if c.model.init != "pretrained":        # the config's own sizes, MGIE's vocabulary
    built = build_lib.shapes_only(c)
  elif build_lib.pretrained(c, "llava"):  # the folders' configs (headers only, no tensor is read)
    from mgie_jax.text import LlamaTokenizer
    built = build_lib.build(c, LlamaTokenizer.from_pretrained(build_lib.tokenizer_dir(c, "")))
  else:                                   # LLaVA-7B v1 + CLIP-L/14 + SD-1.5
    built = build_lib.standard_shapes(c)
  log.info("compiling the train step for %s (%d devices)...", topology, len(devices))
  r = compile_train_step(c, built, devices, seq_len, FLAGS.unroll)
  from mgie_jax.training.flops import peak_tflops
  r.update(estimates(r, sl, sl.peak_tflops if sl else peak_tflops(devices[0])))
  r["topology"] = topology
  print(report(r, topology), flush=True)
  if FLAGS.json:
    from mgie_jax import paths
    paths.path(FLAGS.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
  cli.run(main)
