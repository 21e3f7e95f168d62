"""Convert a trained checkpoint to PyTorch-side formats.

  python -m mgie_jax.export --workdir=/runs/mgie --out=/exports/mgie --format=mgie,llava-v1,llava-hf,diffusers
  python -m mgie_jax.export --checkpoint=/runs/mgie/checkpoints/40000 --out=DIR --dtype=bfloat16

<out>/mgie/{mllm.pt,unet.pt}     the official demo's files (on stock LLaVA-7B and InstructPix2Pix)
<out>/llava-v1/                  a LLaVA v1 folder (MGIE's layout: our importer and the official code),
                                 its vision tower in llava-v1/clip/
<out>/llava-hf/                  transformers' LlavaForConditionalGeneration + processor files
<out>/diffusers/                 an InstructPix2Pix pipeline folder (diffusers)
<out>/peft/{mllm,unet}/          a LoRA run's adapters alone (PEFT's layout; diffusers' for the UNet)
A LoRA run's adapters are merged into every other format (W + alpha / r A B).
The checkpoint is read one module at a time and the frozen towers one tensor at a time from the
folders the run was trained from. Each format is written to a temporary folder and renamed when
complete; an existing output is refused unless --overwrite. README.md shows how to load each.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from absl import flags

from mgie_jax.core import cli, errors

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a training workdir: its latest checkpoint (or --step) is exported")
flags.DEFINE_string("checkpoint", None, "a checkpoint folder (<workdir>/checkpoints/<step>)")
flags.DEFINE_integer("step", None, "with --workdir: this checkpoint step instead of the latest")
flags.DEFINE_string("out", None, "the output folder (one subfolder per format)")
flags.DEFINE_list("format", ["mgie"], "any of mgie, llava-v1, llava-hf, diffusers, peft")
flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"], "tensor dtype of the written files")
flags.DEFINE_integer("max_shard_mb", 5000, "largest safetensors shard of the LLaVA folders, in MB")
flags.DEFINE_bool("overwrite", False, "replace existing output folders")
flags.mark_flags_as_required(["out"])

log = logging.getLogger("mgie_jax.export")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
  cli.quiet_libraries()
  # Deferred until the flags have parsed (--help and flag mistakes answer at once): JAX and the
  # model stack take seconds to import; torch only when a .pt format is asked for.
  import ml_dtypes
  import numpy as np

  from mgie_jax.convert.writers import FORMATS, WRITERS
  from mgie_jax.run import workdir as workdir_lib
  formats = [f.strip() for f in FLAGS.format if f.strip()]
  bad = [f for f in formats if f not in FORMATS]
  if bad or not formats:
    raise errors.BAD_OPTION(flag="--format", detail=f"unknown format(s) {', '.join(bad) or '(none)'}",
                            fix=f"choose from {', '.join(FORMATS)}")
  workdir, step = workdir_lib.locate(FLAGS.workdir, FLAGS.checkpoint, FLAGS.step,
                                     option="--checkpoint=<workdir>/checkpoints/<step> of a trained run")
  c = workdir_lib.saved_config(workdir, step)
  if c.model.get("kind", "mgie") != "mgie" and set(formats) - {"diffusers"}:
    raise errors.BAD_OPTION(flag="--format", detail=f"the run is a {c.model.kind} model, without an MLLM",
                            fix="export it with --format=diffusers")
  lora = dict(c.model.get("lora", None) or {})
  if "peft" in formats and not int(lora.get("rank", 0) or 0):
    raise errors.BAD_OPTION(flag="--format=peft", detail="the run has no LoRA adapters (config.model.lora.rank is 0)",
                            fix="export its weights with mgie, llava-v1, llava-hf or diffusers")
  if "mgie" in formats and "peft" not in formats and int(lora.get("rank", 0) or 0) and any(
      not str(t).startswith("unet") for t in lora.get("targets", ())):
    raise errors.BAD_OPTION(flag="--format=mgie", detail="mllm.pt holds no LLaMA layers, so the run's LoRA on "
                            "the language model would be lost", fix="add peft (the adapters) or export llava-v1 / llava-hf (merged)")
  if "mgie" in formats:
    try:
      import torch  # noqa: F401  (mllm.pt / unet.pt are written with torch.save)
    except ImportError:
      raise errors.BAD_OPTION(flag="--format=mgie", detail="writing .pt files needs torch",
                              fix="pip install 'mgie_jax[torch]', or choose other formats") from None
  targets = {f: os.path.join(FLAGS.out, f) for f in formats}
  taken = [t for t in targets.values() if os.path.exists(t) and os.listdir(t)]
  if taken and not FLAGS.overwrite:
    raise errors.OUT_PATH(flag="--out", path=FLAGS.out, detail=f"{', '.join(taken)} exist(s)",
                          fix="pass --overwrite to replace them, or choose another --out")

  dtype = np.dtype(FLAGS.dtype) if FLAGS.dtype != "bfloat16" else ml_dtypes.bfloat16
  source = workdir_lib.TrainedSource(workdir, step)
  for fmt, target in targets.items():
    t0 = time.time()
    tmp = f"{target}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    kw = {"max_shard_bytes": FLAGS.max_shard_mb << 20} if fmt.startswith("llava") else {}
    if fmt == "llava-v1":
      kw["final"] = target
    WRITERS[fmt](source, tmp, dtype, **kw)
    _move(tmp, target)
    log.info("wrote %s in %.0f s", target, time.time() - t0)
  print(f"exported checkpoint step {step} of {workdir} to {', '.join(targets.values())}")


def _move(src, dst):
  """Replace `dst` by the finished `src` (the old output is removed only now)."""
  if os.path.exists(dst):
    shutil.rmtree(dst)
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  os.replace(src, dst)


if __name__ == "__main__":
  cli.run(main)
