"""LoRA: the trained-parameter count is the formula's; fresh adapters leave the model's outputs
exactly the base's; a train step moves only the adapters and the listed trained set; the merged
exports reproduce the LoRA model's outputs (fp32, 1e-5 x max(1, |ref|)); the adapter-only
export loads with peft (LLaMA) and diffusers (UNet) on the base weights and gives the same
outputs (1e-5 x max(1, |ref|)); the export refuses what it cannot write."""

import json
import os
import subprocess
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from conftest import max_err
from configs import tiny_lora
from data_pipelines.loader import LoaderConfig, make_loader
from mgie_jax.convert.adapters import write_peft
from mgie_jax.convert.writers import write_diffusers, write_llava_v1
from mgie_jax.models import lora as lora_lib
from mgie_jax.models.mgie import sample_draws
from mgie_jax.run import model as model_lib
from mgie_jax.run.workdir import TrainedSource
from mgie_jax.training.checkpoint import Checkpointer
from mgie_jax.training.setup import make_setup
from mgie_jax.training.step import jit_train_step

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = np.float32
TOL = 1e-5


def close(got, want, tol=TOL):
  return max_err(got, want) <= tol * max(1.0, float(np.max(np.abs(want))))


def lora_config(data, **lora):
  c = tiny_lora.get_config()
  c.data.dir, c.data.tokenizer, c.data.num_threads = data[0], data[1], 2
  c.pretrained.vae = ""
  c.eval.at_end = False
  c.model.noise.prediction_type = "epsilon"      # diffusers' default, for the UNet comparisons
  c.model.noise.rescale_betas_zero_snr = False
  c.model.lora.update(lora)
  return c


def a_batch(c, run):
  loader = make_loader(LoaderConfig(data_dir=c.data.dir, batch_size=4, resolution=c.data.resolution,
                                    clip_resolution=run.mcfg.clip_size, tokenizer=c.data.tokenizer,
                                    max_length=c.data.max_length, num_image_tokens=run.mcfg.num_image_tokens,
                                    seed=0, num_threads=2), 0, 1)
  return {k: jnp.asarray(v) for k, v in next(loader).items() if np.asarray(v).dtype.kind in "fiub"}


@pytest.fixture(scope="module")
def lora_run(run_data, tmp_path_factory):
  """Two checkpoints of a LoRA run: step 5 with trained adapters (B non-zero), step 6 with B = 0
  (whose merged export is the base); the step-5 exports: llava-v1 and diffusers merged, and peft."""
  root = tmp_path_factory.mktemp("lora")
  c = lora_config(run_data)
  run = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
  state, frozen = run.new_state()
  key = iter(jax.random.split(jax.random.key(3), 1000))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(key), x.shape, x.dtype), state.params)
  trained = state.replace(params=params)
  zero_b = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if str(getattr(p[-1], "key", p[-1])) == "lora_b" else x, params)
  ckpt = Checkpointer(str(root / "run"), every=1, keep=3, async_save=False)
  config = json.loads(c.to_json_best_effort())
  ckpt.save(5, trained, None, config, force=True)
  ckpt.save(6, state.replace(params=zero_b), None, config, force=True)
  ckpt.close()
  out = root / "out"
  trained_src, base_src = TrainedSource(str(root / "run"), 5), TrainedSource(str(root / "run"), 6)
  write_llava_v1(trained_src, str(out / "merged" / "llava-v1"), F32)
  write_diffusers(trained_src, str(out / "merged" / "diffusers"), F32)
  write_peft(trained_src, str(out / "peft"), F32)
  write_llava_v1(base_src, str(out / "base" / "llava-v1"), F32)
  write_diffusers(base_src, str(out / "base" / "diffusers"), F32)
  return dict(root=root, out=out, c=c, run=run, model=run.model(params, frozen), state=state, frozen=frozen)


def test_trained_parameters_are_the_formula_and_the_base_stays_frozen(lora_run):
  c, run = lora_run["c"], lora_run["run"]
  r, t = c.model.lora.rank, run.mcfg.llava.text
  kv = t.num_key_value_heads * t.head_dim
  shapes = [(t.hidden_size, t.num_attention_heads * t.head_dim), (t.hidden_size, kv), (t.hidden_size, kv),
            (t.num_attention_heads * t.head_dim, t.hidden_size), (t.hidden_size, t.intermediate_size),
            (t.hidden_size, t.intermediate_size), (t.intermediate_size, t.hidden_size)]
  llama = t.num_hidden_layers * sum(r * (i + o) for i, o in shapes)
  # The UNet's attention projections, counted on diffusers' own UNet of the same config.
  from mgie_jax.convert.save import unet_config
  ref = diffusers.UNet2DConditionModel.from_config(unet_config(run.mcfg.unet))
  unet = sum(r * (m.in_features + m.out_features) for name, m in ref.named_modules()
             if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v", "0")
             and (".attn1." in name or ".attn2." in name))
  assert lora_lib.trainable_count(run.built.abstract) == llama + unet
  trainable = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(run.parts.trainable_template)}
  adapters = {k for k in trainable if lora_lib.is_adapter(k)}
  assert sum(int(np.prod(trainable[k].get_value().shape)) for k in adapters) == llama + unet
  # Besides the adapters, exactly the configured prefixes train (no UNet or LLaMA layer weight).
  assert all(any(k == p or k.startswith(p + ".") for p in c.trainable) for k in set(trainable) - adapters)
  assert any(k.startswith("edit_head.") for k in trainable)
  # Optimizer state exists only for what trains: Adam's moments mirror the trained parameters.
  n_trained = sum(x.size for x in jax.tree.leaves(lora_run["state"].params))
  moments = [x.size for x in jax.tree.leaves(lora_run["state"].opt_state) if x.ndim > 0]
  assert sum(moments) == 2 * n_trained
  # The adapted layers' bases are frozen, in the frozen dtype, and the factors carry logical axes.
  q = "mllm.language_model.model.layers.self_attn.q_proj"
  frozen = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(run.parts.frozen_template)}
  assert f"{q}.kernel" in frozen and f"{q}.lora_a" in trainable
  assert trainable[f"{q}.lora_a"].get_metadata()["out_sharding"] == ("layers", "embed", None)
  assert trainable[f"{q}.lora_b"].get_metadata()["out_sharding"] == ("layers", None, "heads")


def test_fresh_adapters_leave_the_first_step_exactly_the_base_models(run_data):
  c_lora = lora_config(run_data)
  c_base = lora_config(run_data, rank=0, targets=())
  models = []
  for c in (c_base, c_lora):
    run = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
    models.append((run, run.model(*[model_lib.seeded_split(c, run.built)[0], run.frozen()])))
  (run, base), (_, adapted) = models
  batch = a_batch(c_lora, run)
  side = c_lora.data.resolution // 2 ** (len(run.mcfg.vae.block_out_channels) - 1)
  draws = sample_draws(jax.random.key(0), 4, (side, side, run.mcfg.vae.latent_channels), run.mcfg.num_train_timesteps)
  a, b = base.losses(batch, draws), adapted.losses(batch, draws)
  for k in ("loss", "ins", "edit"):
    assert float(a[k]) == float(b[k]), k
  np.testing.assert_array_equal(np.asarray(base.mllm(batch["input_ids"], batch["clip_image"]).logits),
                                np.asarray(adapted.mllm(batch["input_ids"], batch["clip_image"]).logits))


def test_a_train_step_moves_the_adapters_and_the_trained_set_only(run_data):
  c = lora_config(run_data, dropout=0.1)
  c.train.lr_mllm = c.train.lr_diffusion = 1e-2
  c.train.warmup_frac = 0.0
  run = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
  state, frozen = run.new_state()
  before = jax.tree.map(np.asarray, state.params)
  step = jit_train_step(run, c.data.resolution)
  batch = a_batch(c, run)
  for _ in range(2):              # the schedule's first step has learning rate 0 (warm-up from 0)
    state, m = step(state, frozen, batch)
    assert np.isfinite(float(m["loss"]))
  after = jax.tree.map(np.asarray, state.params)
  moved = jax.tree_util.tree_map_with_path(lambda p, x, y: (jax.tree_util.keystr(p), not np.array_equal(x, y)),
                                           before, after)
  moved = dict(jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)))
  lora_b = [k for k in moved if "lora_b" in k]
  assert lora_b and all(moved[k] for k in lora_b)        # B leaves zero at once
  assert all(moved[k] for k in moved if "edit_head" in k)


def test_adapter_dropout_is_on_only_inside_a_training_step_and_differs_per_layer():
  import contextlib
  from mgie_jax.models import layers
  cfg = lora_lib.LoraConfig(rank=8, alpha=8.0, dropout=0.5, targets=("x",))

  class Holder(nnx.Module):
    def __init__(self):
      self.x = layers.stacked(lambda r: layers.linear(8, 8, ("embed", "mlp"), rngs=r), 3, nnx.Rngs(0))
  h = Holder()
  lora_lib.add_adapters(h, cfg, jax.random.key(1))
  # Base 0 and A = B = I: each layer's output is dropout(x) itself, so its mask shows.
  eye = jnp.broadcast_to(jnp.eye(8), (3, 8, 8))
  h.x.kernel[...], h.x.bias[...] = jnp.zeros((3, 8, 8)), jnp.zeros((3, 8))
  h.x.lora_a[...], h.x.lora_b[...] = eye, eye
  x = jnp.ones((1, 64, 8))

  def run(key=None):
    def body(layer, carry, _):
      return carry, layer(x)
    with lora_lib.dropout(key) if key is not None else contextlib.nullcontext():
      return np.asarray(layers.scan_layers(h.x, body, 0)[1])
  plain = run()
  np.testing.assert_array_equal(plain, np.ones((3, 1, 64, 8)))          # no dropout outside a step
  dropped = run(jax.random.key(5))
  kept = dropped != 0
  assert set(np.unique(dropped)) <= {0.0, 2.0}                          # kept inputs scaled by 1 / (1 - p)
  assert 0.35 < kept.mean() < 0.65
  assert not np.array_equal(kept[0], kept[1]) and not np.array_equal(kept[1], kept[2])
  with pytest.raises(ValueError, match="matches no Linear"):
    lora_lib.add_adapters(Holder(), lora_lib.LoraConfig(rank=2, targets=("nothing_here",)), jax.random.key(0))


def _llama(folder):
  cfg = json.load(open(folder / "config.json"))
  tensors = {}
  for name in sorted(set(json.load(open(folder / "model.safetensors.index.json"))["weight_map"].values())
                     if os.path.exists(folder / "model.safetensors.index.json") else ["model.safetensors"]):
    tensors.update(load_file(str(folder / name)))
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **{k: v for k, v in cfg.items() if not k.startswith("mm_")})).eval()
  llama.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items() if "mm_projector" not in k}, strict=True)
  return llama


def _unet_inputs():
  rng = np.random.default_rng(1)
  return rng.normal(size=(2, 8, 16, 16)).astype(F32), np.array([10, 700]), rng.normal(size=(2, 77, 32)).astype(F32)


def _our_outputs(model, vocab):
  ids = np.random.default_rng(2).integers(3, vocab, (2, 12))
  x, t, ctx = _unet_inputs()
  logits = np.asarray(model.mllm.language_model(jnp.asarray(ids)).logits)
  eps = np.asarray(model.unet(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx)))
  return ids, logits, eps.transpose(0, 3, 1, 2)


def _torch_unet(unet):
  x, t, ctx = _unet_inputs()
  with torch.no_grad():
    return unet(torch.as_tensor(x), torch.as_tensor(t), encoder_hidden_states=torch.as_tensor(ctx)).sample.numpy()


def test_the_merged_exports_reproduce_the_lora_model(lora_run):
  out, model, run = lora_run["out"], lora_run["model"], lora_run["run"]
  ids, logits, eps = _our_outputs(model, run.mcfg.llava.text.vocab_size)
  llama = _llama(out / "merged" / "llava-v1")
  with torch.no_grad():
    want = llama(torch.as_tensor(ids)).logits.numpy()
  assert close(logits, want)
  unet = diffusers.UNet2DConditionModel.from_pretrained(str(out / "merged" / "diffusers" / "unet")).eval()
  assert close(eps, _torch_unet(unet))
  # ... and the merge is not a no-op: the base's outputs differ.
  base = _llama(out / "base" / "llava-v1")
  with torch.no_grad():
    assert not close(logits, base(torch.as_tensor(ids)).logits.numpy())


def test_the_peft_adapters_load_with_peft_and_diffusers_on_the_base(lora_run):
  out, model, run = lora_run["out"], lora_run["model"], lora_run["run"]
  ids, logits, eps = _our_outputs(model, run.mcfg.llava.text.vocab_size)
  llama = peft.PeftModel.from_pretrained(_llama(out / "base" / "llava-v1"), str(out / "peft" / "mllm")).eval()
  with torch.no_grad():
    want = llama(torch.as_tensor(ids)).logits.numpy()
  assert close(logits, want)
  unet = diffusers.UNet2DConditionModel.from_pretrained(str(out / "base" / "diffusers" / "unet")).eval()
  unet.load_lora_adapter(str(out / "peft" / "unet"), weight_name="pytorch_lora_weights.safetensors", prefix=None)
  assert close(eps, _torch_unet(unet))
  # peft's own loader reads the UNet folder too (adapter_config.json + adapter_model.safetensors).
  plain = diffusers.UNet2DConditionModel.from_pretrained(str(out / "base" / "diffusers" / "unet")).eval()
  wrapped = peft.PeftModel.from_pretrained(plain, str(out / "peft" / "unet")).eval()
  assert close(eps, _torch_unet(wrapped.base_model.model))


def test_export_refuses_the_formats_that_cannot_hold_the_run(lora_run, saved_run, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  cases = ((str(lora_run["root"] / "run"), "mgie", "mllm.pt holds no LLaMA layers"),
           (saved_run, "peft", "has no LoRA adapters"))
  for workdir, fmt, says in cases:
    p = subprocess.run([sys.executable, "-m", "mgie_jax.export", f"--workdir={workdir}", f"--out={tmp_path / fmt}",
                        f"--format={fmt}"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0], p.stderr
    assert not os.path.exists(tmp_path / fmt)
