"""Ahead-of-time compiles for TPU slices on a machine without TPUs (mgie_jax.compile)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from configs import tiny
from mgie_jax.run.model import trainable_filter
from test_cli import run_cases, user_error

pytestmark = pytest.mark.slow      # the fast tier (-m 'not slow') leaves these out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not installed (pip install -e ".[tpu]")')


def small_config():
  c = tiny.get_config()
  c.pretrained.vae = ""          # shapes only: the config's own VAE shape
  c.train.batch_size = 8
  return c


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
  """The command on a small config for a 4-chip v5e slice, in its own process (libtpu stays out
  of the test process)."""
  from mgie_jax.run import model as build
  out = tmp_path_factory.mktemp("compile") / "result.json"
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-m", "mgie_jax.compile", "--config=configs/tiny.py", "--topology=v5e-4",
                        "--unroll", "--config.pretrained.vae=", "--config.train.batch_size=8", f"--json={out}",
                        "--examples=1000", "--epochs=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "memory per device" in res.stdout and "compiler estimate: step" in res.stdout, res.stdout
  return small_config(), build.shapes_only(small_config()), json.loads(out.read_text())


@needs_libtpu
def test_small_config_compiles_for_a_tpu_slice_and_reports_memory(compiled):
  c, built, r = compiled
  assert r["devices"] == 4 and "TPU v5 lite" in r["device_kind"]
  # Arguments: the fp32 trainable parameters, two Adam moments and the frozen towers, all
  # FSDP-sharded over 4 chips, plus the batch. Small tensors (norms, biases) and dimensions
  # 4 does not divide stay replicated, so per device is between a quarter and all of it.
  count = lambda f: sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(built.abstract, f))))
  trainable, total = count(trainable_filter(c.trainable)), count(nnx.Param)
  state_bytes = 4 * (3 * trainable + (total - trainable))
  args = r["argument_gib"] * 2 ** 30
  assert state_bytes / 4 < args < state_bytes * 1.2, (args, state_bytes)
  assert r["temp_gib"] > 0 and r["total_gib"] < r["hbm_gib"]


@needs_libtpu
def test_cost_model_counts_every_layer_and_gives_a_positive_step_time(compiled):
  _, _, r = compiled
  # Unrolled, the compiled FLOPs (all devices) agree with the model count within what remat,
  # the optimizer and the sampling of draws add; with a scanned stack they would be far lower.
  compiled_total = r["compiled_tflops_per_device"] * r["devices"]
  assert 0.8 < compiled_total / r["model_tflops_per_step"] < 1.6, r
  assert r["uncosted_ops"] >= 0 and r["cost_model_step_s"] > 0, r
  # No faster than the chips' peak allows (the raw figure can be: libtpu prices a few custom
  # calls at -1 s each, which the command adds back).
  assert r["compute_floor_s"] == pytest.approx(compiled_total / r["devices"] / 197.0)
  assert r["cost_model_step_s"] >= r["compute_floor_s"], r
  assert 0 < r["mfu"] < 1 and r["samples_per_s"] == pytest.approx(8 / r["cost_model_step_s"])
  # The price of 1,000 examples x 2 epochs at batch 8: 250 steps on 4 chips.
  assert r["steps"] == 250 and r["hours"] == pytest.approx(250 * r["cost_model_step_s"] / 3600)
  assert r["chip_hours"] == pytest.approx(4 * r["hours"])


@needs_libtpu
def test_an_edit_compiles_for_one_chip_piece_by_piece(tmp_path, compiled):
  """--program=edit on the small config for one v5e chip: every piece of an edit, priced, the
  loops' steps multiplied out, all weights held once."""
  _, built, _ = compiled
  out = tmp_path / "edit.json"
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-m", "mgie_jax.compile", "--config=configs/tiny.py", "--topology=v5e-1",
                        "--config.pretrained.vae=", "--program=edit", "--resolution=64", "--steps=20",
                        "--new_tokens=16", f"--json={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  r = json.loads(out.read_text())
  assert "s per edit" in res.stdout and r["devices"] == 1 and "TPU v5 lite" in r["device_kind"]
  pieces = {p["piece"]: p for p in r["pieces"]}
  assert [(p["piece"], p["count"]) for p in r["pieces"]] == [
      ("prefill", 1), ("decode step", 15), ("[IMG] pass + edit head", 1), ("VAE encode", 1),
      ("sampler step (3 UNet branches)", 20), ("VAE decode", 1)]
  assert all(p["seconds"] > 0 and p["flops"] > 0 for p in r["pieces"]), r["pieces"]
  assert r["seconds_per_edit"] == pytest.approx(sum(p["count"] * p["seconds"] for p in r["pieces"]))
  # A decode step feeds one token against the KV cache: far less work than the 80-token prefill.
  assert pieces["decode step"]["flops"] < pieces["prefill"]["flops"] / 10
  # Every piece holds all the weights (bf16) once, as arguments (unused ones are not pruned: 0.8
  # of them without keep_unused); TPU tiles pad this model's many tiny tensors (measured 1.26).
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(built.abstract, nnx.Param))))
  assert all(0.95 < p["argument_gib"] * 2 ** 30 / (2 * n) < 1.4 for p in r["pieces"]), (r["pieces"], n)
  assert r["peak_gib"] > r["weights_gib"]


def test_compile_mistakes_are_one_line():
  base = ["--config=configs/ipr2pr.py"]
  cases = {
      "topology": {"module": "mgie_jax.compile", "argv": base + ["--topology=v9-8"],
                   "forbid": ["mgie_jax.training.setup:setup_for"]},
      "batch": {"module": "mgie_jax.compile", "argv": base + ["--topology=local", "--config.train.batch_size=3",
                                                              "--config.mesh.fsdp=2", "--config.mesh.data=-1"],
                "env": {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                "forbid": ["mgie_jax.training.setup:setup_for", "mgie_jax.run.model:standard_shapes"]},
      "price_scanned": {"module": "mgie_jax.compile", "argv": base + ["--topology=local", "--examples=1000"],
                        "forbid": ["mgie_jax.run.model:standard_shapes"]},
      "edit_resolution": {"module": "mgie_jax.compile", "argv": base + ["--topology=local", "--program=edit",
                                                                         "--resolution=100"],
                          "forbid": ["mgie_jax.run.model:standard_shapes"]},
  }
  results = dict(zip(cases, run_cases(list(cases.values()))))
  user_error(results["edit_resolution"], "--resolution", "100", "multiple of 64")
  user_error(results["topology"], "--topology", "v9-8", "v5p-8")
  user_error(results["price_scanned"], "--examples", "--unroll")
  user_error(results["batch"], "train.batch_size 3")


def test_a_program_that_does_not_fit_is_reported_with_xlas_numbers():
  from mgie_jax.training import aot
  message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory in "
             "memory space hbm. Used 15.85G of 15.75G hbm. Exceeded hbm capacity by 100.47M.\n\nTotal hbm usage >= "
             "16.10G:\n    reserved        258.01M \n    program          14.47G \n    arguments       512.00M \n")
  o = aot.hbm_overflow(message)
  assert o == {"used_gib": 15.85, "capacity_gib": 15.75, "program_gib": 14.47, "arguments_gib": 0.5}
  assert aot.hbm_overflow("RESOURCE_EXHAUSTED: something else") is None
  r = dict(devices=16, device_kind="TPU v5 lite", batch=32, seq_len=512, resolution=256, unrolled=True, lower_s=1,
           compile_s=2, does_not_fit=o)
  assert aot.estimates(r, None, 197.0) == {}
  assert "DOES NOT FIT: XLA needs 15.85 of 15.75 GiB HBM per chip (program 14.47, arguments 0.50)" in aot.report(r, "v5e-16")
