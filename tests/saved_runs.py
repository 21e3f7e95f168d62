"""A small synthetic dataset and a saved tiny run (random weights, checkpoints at steps 2, 4, 6):
what the command tests (CLI mistakes, edit, demo) read. Built once per session by conftest."""

import json
import os

import jax

from configs import tiny
from data_pipelines import synthetic
from data_pipelines.ipr2pr import build
from data_pipelines.loader import LoaderConfig, make_loader
from mgie_jax.training.checkpoint import Checkpointer
from mgie_jax.training.setup import make_setup


def write_data(root: str):
  """(built dataset folder, tokenizer folder, source folder)."""
  synthetic.write_dataset(root, prompts=24, seeds=2, size=64)
  builder = build(root, os.path.join(root, "tfds"), "folder", os.path.join(root, "expressive.json"))
  return str(builder.data_dir), os.path.join(root, "tokenizer"), root


def tiny_config(data):
  c = tiny.get_config()
  c.data.dir, c.data.tokenizer = data[0], data[1]
  c.data.num_threads = 2
  c.pretrained.vae = ""
  c.eval.at_end = False
  return c


def write_saved_run(data, workdir: str) -> str:
  """A run with checkpoints at steps 2, 4 and 6 (model, optimizer, data iterator, config)."""
  c = tiny_config(data)
  run = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
  state, _ = run.new_state()
  loader = make_loader(LoaderConfig(data_dir=c.data.dir, batch_size=8, resolution=c.data.resolution,
                                    clip_resolution=28, tokenizer=c.data.tokenizer, max_length=c.data.max_length,
                                    num_image_tokens=16, seed=c.seed, num_threads=2), 0, 1)
  ckpt = Checkpointer(workdir, every=1, keep=5, async_save=False)
  config = json.loads(c.to_json_best_effort())
  for step in (2, 4, 6):
    next(loader)
    ckpt.save(step, state.replace(step=jax.numpy.int32(step)), loader, config, force=True)
  ckpt.close()
  return workdir


def lora_run_on(data, features: str = ""):
  """configs/tiny_lora.py on `data` (images, or the frozen-feature cache `features`) on one device:
  (setup, state, frozen, loader of the training batches, jitted train step)."""
  from configs import tiny_lora
  from mgie_jax.run.batch import batch_spec
  from mgie_jax.training.step import jit_train_step
  c = tiny_lora.get_config()
  c.data.dir, c.data.tokenizer, c.data.num_threads = data[0], data[1], 2
  c.pretrained.vae = ""
  c.data.features = features
  setup = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
  state, frozen = setup.new_state()
  loader = make_loader(LoaderConfig(data_dir=c.data.dir, batch_size=c.train.batch_size, tokenizer=c.data.tokenizer,
                                    seed=c.seed, num_threads=2, features=features,
                                    **batch_spec(c, setup.mcfg).loader_options()), 0, 1)
  return setup, state, frozen, loader, jit_train_step(setup, c.data.resolution)
