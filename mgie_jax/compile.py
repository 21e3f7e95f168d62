"""Compile the train step ahead of time for a TPU slice, on any machine, without weights or TPUs,
and print the compiler's memory and cost estimates (what a user reads to choose a slice).

  pip install -e ".[tpu]"          # libtpu from PyPI: the TPU compiler, no TPU needed
  python -m mgie_jax.compile --config=configs/ipr2pr.py --topology=v5p-8
  python -m mgie_jax.compile --config=configs/ipr2pr.py --topology=v5e-16 \\
      --config.train.batch_size=128 --seq_len=384 --unroll
  python -m mgie_jax.compile --config=configs/tiny.py --topology=local     # this machine's devices
  python -m mgie_jax.compile --config=configs/ipr2pr.py --topology=v5p-2 --program=edit --resolution=512

`--program=edit` prices one edit instead, piece by piece (mgie_jax.inference.edit_aot).

With the config's pretrained folders empty, the towers take their standard shapes (LLaVA-7B v1,
CLIP ViT-L/14, SD-1.5); given, their configs are read (no tensor is). Memory is per device, from
XLA's buffer assignment. FLOPs and step time are XLA's cost-model estimates, not measurements;
XLA counts a loop body once, so pass --unroll for them (layer stacks traced unrolled: the same
math, a longer compile). MFU = the model's FLOPs per step (mgie_jax.training.flops) / devices /
estimated step time / the chip's peak. `--examples=N [--epochs=E]` prices a run at that rate:
hours on the slice and chip-hours (one JAX device per chip on every slice named here).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os

from absl import flags
from ml_collections import config_flags

from mgie_jax.core import cli, errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
flags.DEFINE_string("topology", "v5p-8", "a TPU slice (v4-8, v5p-8, v5e-16, v6e-8, ... see TOPOLOGIES) or 'local'")
flags.DEFINE_integer("seq_len", 0, "token length to compile for (0: config.data.max_length)")
flags.DEFINE_bool("unroll", False, "trace layer stacks unrolled so the cost model counts every layer")
flags.DEFINE_string("json", "", "also write the numbers to this JSON file")
flags.DEFINE_enum("program", "train", ["train", "edit"], "the train step, or one edit (inference)")
flags.DEFINE_integer("resolution", 512, "--program=edit: the image side")
flags.DEFINE_integer("batch", 1, "--program=edit: images per edit")
flags.DEFINE_integer("new_tokens", 32, "--program=edit: tokens of the expressive instruction written")
flags.DEFINE_integer("steps", 100, "--program=edit: sampler steps")
flags.DEFINE_integer("examples", 0, "price a run: training examples (e.g. 313010 for IPr2Pr); needs --unroll")
flags.DEFINE_float("epochs", 1.0, "price a run: passes over --examples")
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
    # One chip (what an edit server runs on): v5p-2 is one v5p chip's two TensorCores.
    "v5e-1": Slice("v5e:1x1", "default", (1, 1, 1), 16, 197.0),
    "v5p-2": Slice("v5:1x1x1", "megacore", (1, 1, 1), 95, 459.0),
    "v6e-1": Slice("v6e:1x1", "default", (1, 1, 1), 32, 918.0),
}


def check(c, topology: str) -> None:
  """The mistakes that need no compiler: unknown slice, missing libtpu, a bad length (the mesh and
  batch are checked once the slice's device count is known)."""
  if topology != "local" and topology not in TOPOLOGIES:
    raise errors.BAD_OPTION(flag="--topology", detail=f"unknown slice {topology!r}",
                            fix=f"use local or one of {', '.join(TOPOLOGIES)}")
  if topology != "local":
    if importlib.util.find_spec("libtpu") is None:
      raise errors.BAD_OPTION(flag="--topology", detail="compiling for TPU needs libtpu",
                              fix='pip install -e ".[tpu]" (no TPU needed), or use --topology=local')
  if FLAGS.seq_len < 0:
    raise errors.BAD_OPTION(flag="--seq_len", detail=str(FLAGS.seq_len), fix="use 0 (max_length) or a length")
  if FLAGS.examples < 0 or FLAGS.epochs <= 0:
    raise errors.BAD_OPTION(flag="--examples/--epochs", detail=f"{FLAGS.examples}/{FLAGS.epochs}",
                            fix="use a count of 0 or more and a positive number of epochs")
  if FLAGS.examples and not FLAGS.unroll:
    raise errors.BAD_OPTION(flag="--examples", detail="a price needs the cost model's step time",
                            fix="add --unroll (scanned layers are counted once)")
  if FLAGS.program == "edit":
    for flag in ("resolution", "batch", "new_tokens", "steps"):
      if getattr(FLAGS, flag) < 1:
        raise errors.BAD_OPTION(flag=f"--{flag}", detail=str(getattr(FLAGS, flag)), fix="use 1 or more")
    if FLAGS.resolution % 64:
      raise errors.BAD_OPTION(flag="--resolution", detail=str(FLAGS.resolution),
                              fix="use a multiple of 64 (the UNet and VAE downsample by 64 together)")
    if c.model.kind != "mgie":
      raise errors.BAD_OPTION(flag="--program=edit", detail=f"model.kind is {c.model.kind!r}",
                              fix="compile an MGIE config (configs/ipr2pr.py, configs/tiny.py)")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
  cli.quiet_libraries()
  c, topology = FLAGS.config, FLAGS.topology
  check(c, topology)
  if topology != "local":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")   # compile for the slice; run nothing on a TPU
  # Deferred until the environment says which platform JAX may start (no TPU is used for a slice).
  from mgie_jax.core import paths
  from mgie_jax.run import model as build_lib
  from mgie_jax.run.checks import check_batch
  from mgie_jax.text import LlamaTokenizer
  from mgie_jax.training import aot
  from mgie_jax.training.flops import peak_tflops
  sl = TOPOLOGIES.get(topology)
  devices = aot.target_devices(topology, sl)
  check_batch(c, len(devices), 1)
  seq_len = FLAGS.seq_len or int(c.data.max_length)
  if c.model.init != "pretrained":        # the config's own sizes, MGIE's vocabulary
    built = build_lib.shapes_only(c)
  elif build_lib.pretrained(c, "llava"):  # the folders' configs (headers only, no tensor is read)
    built = build_lib.build(c, LlamaTokenizer.from_pretrained(build_lib.tokenizer_dir(c, "")))
  else:                                   # LLaVA-7B v1 + CLIP-L/14 + SD-1.5
    built = build_lib.standard_shapes(c)
  if FLAGS.program == "edit":
    from mgie_jax.inference import edit_aot
    log.info("compiling an edit for %s (%d devices)...", topology, len(devices))
    prompt = built.config.llava.num_image_tokens + 64      # image tokens + system prompt and instruction
    r = edit_aot.compile_edit(c, built, devices, resolution=FLAGS.resolution, batch=FLAGS.batch,
                              new_tokens=FLAGS.new_tokens, steps=FLAGS.steps, prompt_length=prompt)
    if sl is not None:
      r["hbm_gib"] = sl.hbm_gib
    r["topology"] = topology
    print(edit_aot.report(r, topology), flush=True)
  else:
    log.info("compiling the train step for %s (%d devices)...", topology, len(devices))
    r = aot.compile_train_step(c, built, devices, seq_len, FLAGS.unroll)
    r.update(aot.estimates(r, sl, sl.peak_tflops if sl else peak_tflops(devices[0]), FLAGS.examples, FLAGS.epochs))
    r["topology"] = topology
    print(aot.report(r, topology), flush=True)
  if FLAGS.json:
    paths.path(FLAGS.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
  cli.run(main)
