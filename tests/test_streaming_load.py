"""Pretrained loading at scale, simulated: a generated LLaVA v1 + InstructPix2Pix folder set of
~45M parameters (safetensors) loaded by configs/ipr2pr.py onto an fsdp=8 mesh of CPU devices.
Each tensor goes from its file straight onto its shards: every device ends with about 1/8 of the
bytes, no device ever holds a whole large tensor, and host memory grows by what the devices hold
(on CPU, device memory is host memory) plus a few tensors, not by another copy of the model."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ORIGINAL_XLA_FLAGS, xla_flags
from configs import tiny
from data_pipelines import synthetic
from mgie_jax.run.workdir import TrainedSource
from mgie_jax.convert.writers import write_diffusers, write_llava_v1
from mgie_jax.training.checkpoint import Checkpointer
from mgie_jax.training.setup import make_setup

pytestmark = pytest.mark.slow      # the fast tier (-m 'not slow') leaves these out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
  root = tmp_path_factory.mktemp("streaming")
  synthetic.train_tokenizer(str(root / "tok"), ["make the square blue", "the red square becomes blue."] * 50)
  c = tiny.get_config()
  c.data.tokenizer = str(root / "tok")
  c.pretrained.vae = ""
  # A 6-layer 768-wide LLaMA (~42M parameters) and CLIP: the bulk, in many tensors.
  c.model.text = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                      num_key_value_heads=12, max_position_embeddings=512)
  c.model.vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                        image_size=28, patch_size=7)
  c.model.edit_head = dict(llm_dim=768, width=64, heads=4, ffn=128, encoder_layers=1, decoder_layers=1,
                           num_queries=77, out_dim=32)
  c.model.noise.prediction_type = "epsilon"
  c.model.noise.rescale_betas_zero_snr = False
  run = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
  state, _ = run.new_state()
  ckpt = Checkpointer(str(root / "run"), every=1, keep=1, async_save=False)
  ckpt.save(1, state, None, json.loads(c.to_json_best_effort()), force=True)
  ckpt.close()
  del state
  source = TrainedSource(str(root / "run"), 1)
  write_llava_v1(source, str(root / "llava"), np.float32, max_shard_bytes=50_000_000)
  write_diffusers(source, str(root / "sd"), np.float32)
  args = {"llava": str(root / "llava"), "sd": str(root / "sd"), "edit_head": dict(c.model.edit_head)}
  env = dict(os.environ, XLA_FLAGS=xla_flags(8, ORIGINAL_XLA_FLAGS),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "load_probe.py"), json.dumps(args)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_each_device_holds_an_eighth(probe):
  p = probe
  assert p["devices"] == 8 and p["parameters"] > 40e6
  per = np.array(list(p["per_device"].values()))
  share = p["state_bytes"] / 8
  # Small replicated tensors (norms, biases, indivisible dimensions) add a little to each.
  assert per.max() < 1.15 * share and per.min() > 0.85 * share, (per, share)
  assert p["full_copies"] == []                                   # every tensor >= 1 MiB is split


def test_no_device_ever_held_more_than_its_share(probe):
  p = probe
  peak = max(p["peak_per_device"].values())
  final = max(p["per_device"].values())
  # Checked after every tensor: the most a device held is its final share (optimizer moments
  # are made after the parameters, so the peak while loading is below the final).
  assert peak <= final, (peak, final)


def test_host_memory_grows_by_the_shards_not_a_model_copy(probe):
  p = probe
  growth = p["max_rss"] - p["rss_before"]       # an upper bound: the peak may precede the load
  # Bound: what the 8 CPU devices hold (host memory here) + 4 of the largest tensors (one being
  # read, its dtype conversion, its shards) + 300 MB for the compiled optimizer init and runtime.
  bound = p["state_bytes"] + 4 * p["largest_tensor"] + 300e6
  print(f"host growth {growth / 1e6:.0f} MB; devices hold {p['state_bytes'] / 1e6:.0f} MB; "
        f"largest tensor {p['largest_tensor'] / 1e6:.0f} MB; bound {bound / 1e6:.0f} MB")
  assert growth < bound, (growth, bound)
