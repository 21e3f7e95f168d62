"""LGIE (configs/tiny_lgie.py, template "text_only"): the language model receives no image
information. Two different images with the same instruction give LGIE identical written text,
identical edit-head conditions and identical training L_ins; MGIE's conditions and L_ins differ.
Random-weight tiny models, exact equality (the same program on the same inputs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import tiny, tiny_lgie
from data_pipelines.loader import LoaderConfig, make_loader
from mgie_jax.inference import pipeline as inference
from mgie_jax.models.mgie import sample_draws
from mgie_jax.run import model as model_lib
from mgie_jax.run.batch import batch_spec
from mgie_jax.text import LlamaTokenizer, prompt_text


def model_for(get_config, data):
  c = get_config()
  c.data.dir, c.data.tokenizer, c.pretrained.vae = data[0], data[1], ""
  tok = LlamaTokenizer.from_pretrained(data[1])
  built = model_lib.build(c, tok)
  trainable, frozen = model_lib.seeded_split(c, built)
  parts = model_lib.split_model(built.abstract, c.trainable)
  # Random towers write little; perturb so that the hidden states carry what the input holds.
  key = iter(jax.random.split(jax.random.key(7), 10000))
  trainable = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(key), x.shape, x.dtype), trainable)
  return c, tok, parts.merge(trainable, frozen)


@pytest.fixture(scope="module")
def two_images():
  rng = np.random.default_rng(0)
  return [Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)) for _ in range(2)]


def test_the_lgie_prompt_holds_no_image():
  assert prompt_text("make it blue", 16, "text_only").endswith("USER: what will this image be like if 'make it blue' ASSISTANT:")


@pytest.mark.parametrize("name", ["lgie", "mgie"])
def test_lgie_writes_and_conditions_the_same_for_any_image_and_mgie_does_not(run_data, two_images, name):
  c, tok, model = model_for(tiny_lgie.get_config if name == "lgie" else tiny.get_config, run_data)
  assert model.config.sees_image == (name == "mgie")
  _, clip = inference.prepare(two_images, c.data.resolution, model.config.clip_size)
  texts, cond, null = inference.expressive_instructions(model, tok, clip, ["make the square blue"] * 2,
                                                        max_new_tokens=8)
  same = np.array_equal(np.asarray(cond[0]), np.asarray(cond[1]))
  if name == "lgie":
    assert texts[0] == texts[1] and same
  else:
    assert not same
  # The training loss: L_ins of one example with its own image, and with another example's image.
  spec = batch_spec(c, model.config)
  batch = next(make_loader(LoaderConfig(data_dir=c.data.dir, batch_size=2, tokenizer=c.data.tokenizer, seed=0,
                                        num_threads=2, **spec.loader_options()), 0, 1))
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "key"}
  swapped = {**batch, "clip_image": batch["clip_image"][::-1]}
  draws = sample_draws(jax.random.key(0), 2, (16, 16, 4), model.config.num_train_timesteps)
  ins = [float(model.losses(b, draws)["ins"]) for b in (batch, swapped)]
  assert (ins[0] == ins[1]) == (name == "lgie"), ins
  if name == "lgie":      # and no image token in its sequences
    assert not np.any(np.asarray(batch["input_ids"]) == model.config.llava.image_token_id)


@pytest.mark.slow
def test_an_lgie_export_writes_the_same_in_pytorch_without_the_image(run_data, two_images, tmp_path):
  """The mgie + llava-hf + diffusers exports of an LGIE run: the PyTorch pipeline (transformers'
  LLaVA, given no image) writes our tokens and gives our condition (1e-4 x max(1, |ref|))."""
  import json

  import torch

  from conftest import max_err, tol
  from mgie_jax.convert.writers import write_diffusers, write_llava_hf, write_mgie
  from mgie_jax.inference.pytorch_pipeline import MGIEPipeline
  from mgie_jax.run.workdir import TrainedSource
  from mgie_jax.training.checkpoint import Checkpointer
  from mgie_jax.training.setup import make_setup
  c = tiny_lgie.get_config()
  c.data.dir, c.data.tokenizer, c.pretrained.vae, c.train.ema_decay = run_data[0], run_data[1], "", 0.0
  run = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
  state, frozen = run.new_state()
  key = iter(jax.random.split(jax.random.key(8), 10000))
  state = state.replace(params=jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(key), x.shape, x.dtype),
                                            state.params))
  ckpt = Checkpointer(str(tmp_path / "run"), every=1, keep=2, async_save=False)
  ckpt.save(3, state, None, json.loads(c.to_json_best_effort()), force=True)
  ckpt.close()
  source, out = TrainedSource(str(tmp_path / "run"), 3), tmp_path / "out"
  write_mgie(source, str(out / "mgie"), np.float32)
  write_llava_hf(source, str(out / "llava-hf"), np.float32)
  write_diffusers(source, str(out / "diffusers"), np.float32)
  model = run.model(state.params, frozen)
  _, clip = inference.prepare(two_images[:1], c.data.resolution, model.config.clip_size)
  texts, cond, _ = inference.expressive_instructions(model, run.tok, clip, ["make the square blue"], max_new_tokens=8)
  pipe = MGIEPipeline.from_export(str(out))
  assert pipe.template == "text_only"
  text, t_cond, _ = pipe.expressive(torch.as_tensor(clip.transpose(0, 3, 1, 2).copy()), "make the square blue",
                                    max_new_tokens=8)
  # The condition is read after the written tokens, so equal conditions mean the same tokens were
  # written; the texts themselves are compared only where both tokenizers decode alike (random
  # weights write byte-fallback pieces, which transformers' and ours render differently).
  assert max_err(t_cond.numpy(), cond) <= tol(cond)
  printable = lambda t: "".join(ch for ch in t if ch.isascii() and ch.isalnum())
  assert texts[0] and printable(text)[:4] == printable(texts[0])[:4]
