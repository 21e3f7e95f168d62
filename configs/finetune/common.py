"""What fine-tuning on a benchmark's training split shares (configs/finetune/<benchmark>.py).

Starts from one of: a run's checkpoint (`--config.init_from=<workdir>/checkpoints/<step>`: its
trained weights, a fresh optimizer, step count and data iterator), the released MGIE
(`--config.pretrained.mllm_pt=... --config.pretrained.unet_pt=...` on the LLaVA and SD folders),
or, for the text-only baseline, an InstructPix2Pix folder. The data is the benchmark's train split
built by `python -m data_pipelines.build <benchmark>`; its records have no expressive instructions,
so `--config.data.expressive` names a {key: expressive} JSON for them, and without one each
record trains on its own instruction as the target (counted in the log).

Numbers: the paper says each editor is fine-tuned on each benchmark's training data but gives
neither the budget nor the learning rates; the values here are guesses (stated where set):
the IPr2Pr recipe's optimizer at a fifth of its learning rate, a short warm-up, a few epochs.
"""

from configs import ipr2pr


def finetune(arg, benchmark: str, steps: int, eval_split: str = "validation"):
  c = ipr2pr.get_config(arg)
  c.data.dir = ""                          # required: <data_dir>/<benchmark>/<config>/1.0.0 (its train split)
  c.data.length_buckets = (384, 448)
  c.train.steps = steps                    # a guess: a few epochs at batch 32 (see each file)
  c.train.batch_size = 32
  c.train.lr_mllm = 1e-4                   # a guess: a fifth of the IPr2Pr recipe's 5e-4
  c.train.lr_diffusion = 1e-4
  c.train.warmup_frac = 0.05               # a guess
  c.checkpoint.every = 500
  c.log.sample_every = 0
  c.eval.update(split=eval_split, examples=64, every=1000)
  c.benchmark = benchmark                  # for the record: which benchmark's train split this is
  return c
