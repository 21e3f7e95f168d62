"""The frozen-feature cache: training on it gives the losses training on the images gives; a kill -9
while caching, then a re-run, leaves the same files as an uninterrupted run; a cache that does not
belong to the configured towers is refused in one line.

Losses with and without the cache: 20 steps of the trainer's own step on the same batches agree to
2e-6 relative. Not bit for bit: the cached features come from a separately compiled program (the
cache command's, at its batch size), whose fused kernels round differently in the last bit; the
20 steps measured on this CPU differ by at most 1.1e-7 relative, and the bound leaves room for
other CPUs' kernels.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from data_pipelines import feature_cache
from mgie_jax.core.fingerprint import tree_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_RTOL = 2e-6


def flags(data):
  return ["--config=configs/tiny_lora.py", f"--config.data.dir={data[0]}", f"--config.data.tokenizer={data[1]}",
          "--config.pretrained.vae=", "--config.data.num_threads=2"]


def cache_cmd(data, out, *extra):
  return [sys.executable, "-m", "data_pipelines.features", *flags(data), f"--out={out}", "--batch_size=8",
          "--shard_size=8", *extra]


def run(cmd, **kw):
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def error_line(p):
  lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
  return lines[-1] if lines else ""


def files(folder):
  return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def cache(run_data, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("features") / "cache")
  p = run(cache_cmd(run_data, out))
  assert p.returncode == 0, p.stderr[-3000:]
  return out


# --- fast: the fingerprint and the record format ---------------------------------------------------

def test_the_fingerprint_ignores_the_sharding_and_sees_one_bit():
  x = np.random.default_rng(0).normal(size=(16, 24)).astype(np.float32)
  tree = {"a": {"w": x}, "b": np.arange(8, dtype=np.float32)}
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(8), ("d",))
  sharded = {"a": {"w": jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))},
             "b": jax.device_put(tree["b"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))}
  assert tree_fingerprint(tree, {"k": 1}) == tree_fingerprint(sharded, {"k": 1})
  flipped = x.copy()
  flipped.view(np.uint32)[3, 5] ^= 1            # one ulp of one weight
  assert tree_fingerprint({"a": {"w": flipped}, "b": tree["b"]}, {"k": 1}) != tree_fingerprint(tree, {"k": 1})
  assert tree_fingerprint(tree, {"k": 2}) != tree_fingerprint(tree, {"k": 1})
  swapped = {"a": {"w": x[::-1].copy()}, "b": tree["b"]}     # same values, other places
  assert tree_fingerprint(swapped, {"k": 1}) != tree_fingerprint(tree, {"k": 1})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_records_round_trip_and_keep_skips(dtype):
  meta = feature_cache.Meta("f", {}, (("m", (2, 3)), ("c", (4,))), dtype, 8, {"train": 2})
  rng = np.random.default_rng(1)
  arrays = {"m": rng.normal(size=(2, 3)).astype(np.float32), "c": rng.normal(size=(4,)).astype(np.float32)}
  key, got, reason = feature_cache.unpack(feature_cache.pack(b"k0", arrays, meta), meta)
  assert (key, reason) == (b"k0", "")
  for name, a in arrays.items():
    want = a if dtype == "float32" else a.astype(feature_cache.DTYPES[dtype]).astype(np.float32)
    assert got[name].dtype == np.float32 and np.array_equal(got[name], want)
  assert feature_cache.unpack(feature_cache.pack(b"k1", None, meta, "too_small"), meta) == (b"k1", None, "too_small")
  with pytest.raises(ValueError, match="shape"):
    feature_cache.pack(b"k2", {"m": np.zeros((3, 2)), "c": arrays["c"]}, meta)


# --- slow: the command and the trainer -------------------------------------------------------------

@pytest.mark.slow
def test_twenty_steps_on_the_cache_give_the_losses_of_twenty_on_the_images(run_data, cache):
  from saved_runs import lora_run_on
  losses = {}
  for name, features in (("images", ""), ("cache", cache)):
    _, state, frozen, loader, step = lora_run_on(run_data, features)
    out = []
    for _ in range(20):
      batch = next(loader)
      batch.pop("key")
      assert ("input_image" in batch) == (not features) and ("clip_features" in batch) == bool(features)
      state, metrics = step(state, frozen, batch)
      out.append([float(metrics[k]) for k in ("loss", "ins", "edit")])
    losses[name] = np.asarray(out)
  a, b = losses["images"], losses["cache"]
  assert np.all(np.abs(a - b) <= LOSS_RTOL * np.abs(a)), np.max(np.abs(a - b) / np.abs(a))
  assert a[-1, 0] < a[0, 0]      # it trains: the steps are not all the same


@pytest.mark.slow
def test_a_kill_while_caching_then_a_rerun_writes_the_uninterrupted_files(run_data, cache, tmp_path):
  out = str(tmp_path / "cache")
  proc = subprocess.Popen(cache_cmd(run_data, out, "--shard_size=1"), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [n for n in os.listdir(out) if ".array_record-" in n and ".partial-" not in n] if os.path.isdir(out) else []
    if len(done) >= 3:
      break
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  shards = [n for n in os.listdir(out) if ".array_record-" in n and ".partial-" not in n]
  total = len(feature_cache.read_meta(out).shard_paths(out, "train"))
  assert 3 <= len(shards) < total, (len(shards), total)    # killed in the middle
  p = run(cache_cmd(run_data, out, "--shard_size=1"))
  assert p.returncode == 0, p.stderr[-3000:]
  again = files(out)
  assert not [n for n in again if ".partial-" in n]          # the killed run's partial file is gone
  clean = str(tmp_path / "clean")
  p = run(cache_cmd(run_data, clean, "--shard_size=1"))
  assert p.returncode == 0, p.stderr[-3000:]
  assert again == files(clean)
  # The same records as the module's cache, whose shards hold 8 records each.
  meta = feature_cache.read_meta(cache)
  via = lambda folder: [r for path in feature_cache.read_meta(folder).shard_paths(folder, "train")
                        for r in _records(path)]
  assert via(out) == via(cache) and len(via(cache)) == meta.splits["train"]


def _records(path):
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(path)
  out = reader.read_all()
  reader.close()
  return out


@pytest.mark.slow
def test_a_cache_of_other_towers_or_an_unfinished_one_is_refused_in_one_line(run_data, cache, tmp_path):
  train = lambda *extra: run([sys.executable, "-m", "mgie_jax.train", *flags(run_data), f"--workdir={tmp_path / 'run'}",
                              "--config.train.steps=2", *extra])
  # Other weights (a different seed): told by the config alone, before any model is built.
  p = train(f"--config.data.features={cache}", "--config.seed=1")
  assert p.returncode == 2 and error_line(p).startswith(f"error: the frozen-feature cache {cache} was made by"), p.stderr[-2000:]
  # Same config, other weights: the loaded towers' fingerprint differs (a re-trained VAE in the same folder).
  forged = str(tmp_path / "forged")
  shutil.copytree(cache, forged)
  meta = json.load(open(os.path.join(forged, "meta.json")))
  meta["fingerprint"] = "0" * 32
  json.dump(meta, open(os.path.join(forged, "meta.json"), "w"))
  p = train(f"--config.data.features={forged}")
  assert p.returncode == 2 and "the configured VAE and CLIP weights give" in error_line(p), p.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "2")
  # An unfinished cache.
  os.remove(feature_cache.read_meta(forged).shard_paths(forged, "train")[1])
  p = train(f"--config.data.features={forged}")
  assert p.returncode == 2 and "lacks 1 of its 6 train shards" in error_line(p), p.stderr[-2000:]
  # No cache at all, and a config that trains the CLIP tower.
  p = train(f"--config.data.features={tmp_path}")
  assert p.returncode == 2 and "holds no frozen-feature cache" in error_line(p), p.stderr[-2000:]
  p = run([sys.executable, "-m", "data_pipelines.features", "--config=configs/tiny.py",
           f"--config.data.dir={run_data[0]}", f"--out={tmp_path / 'x'}"])
  assert p.returncode == 2 and "config.trainable 'mllm' trains" in error_line(p), p.stderr[-2000:]
  # The cache command refuses to mix: a cache made by other towers is not extended.
  p = run(cache_cmd(run_data, cache, "--config.seed=1"))
  assert p.returncode == 2 and "was made by" in error_line(p), p.stderr[-2000:]
