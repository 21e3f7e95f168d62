"""Evaluation sweeps: editors x guidance grid x seeds on a benchmark, with the papers' metrics.

  python -m mgie_jax.evaluate --config=configs/eval/magicbrush.py --workdir=/evals/mb \\
      --config.dataset.dir=/data/tfds/magic_brush/folder/1.0.0 --config.runs=/runs/mgie \\
      --config.steps=5000,10000 --config.text_scales=3,5,7.5 --config.image_scales=1.5 \\
      --config.metric_models.clip=/ckpt/clip-vit-base-patch32 --config.metric_models.dino=/ckpt/dino-vits16

Editors: the checkpoints of our training workdirs (`runs`, `steps`), a pretrained MGIE such as
the released mllm.pt / unet.pt (`pretrained.*`), an InstructPix2Pix diffusers folder (`ip2p`), and
always the copy-the-input row. Results go to <workdir>/results.p<process>.jsonl as they are scored
(a re-run resumes and skips finished rows), then <workdir>/summary.csv, table.md and plots/*.png.
Every input is checked before a model is loaded; a mistake is one line on stderr, exit code 2.
"""

from __future__ import annotations

import logging

from absl import flags
from ml_collections import config_flags

from mgie_jax.core import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "evaluation config (configs/eval/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "results, tables, plots (and edited images) go here; reused to resume")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host without autodetection)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
  cli.quiet_libraries()
  # Deferred until the flags have parsed (--help and flag mistakes answer at once): JAX, the
  # models and the metrics take seconds to import.
  from mgie_jax.core import parallel
  from mgie_jax.evaluation import campaign
  parallel.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  campaign.evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
