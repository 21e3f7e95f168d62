"""First contact: every mistake a user makes with the commands is one line on stderr with exit
code 2, found before any model is built; nothing is written or lost on the way."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ORIGINAL_XLA_FLAGS, xla_flags
from data_pipelines import synthetic
from mgie_jax.core import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_MODELS = ["mgie_jax.run.model:build", "mgie_jax.training.setup:make_setup", "mgie_jax.run.workdir:load"]


def run_cases(cases):
  """Each case in a forked child of one driver process (tests/cli_cases.py)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(1, ORIGINAL_XLA_FLAGS),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cli_cases.py")], input=json.dumps(cases),
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


def user_error(result, *words):
  """Exit code 2, one `error:` line that holds `words`, no traceback."""
  assert result["rc"] == 2, result
  assert "Traceback" not in result["stderr"], result["stderr"][-2000:]
  lines = [l for l in result["stderr"].splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, result["stderr"]
  for w in words:
    assert w in lines[0], (w, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def data(run_data):
  return run_data


def train_flags(data, workdir, *extra):
  return ["--config=configs/tiny.py", f"--workdir={workdir}", f"--config.data.dir={data[0]}",
          f"--config.data.tokenizer={data[1]}", "--config.log.sample_every=0", "--config.log.tensorboard=False",
          "--config.data.num_threads=2", "--config.pretrained.vae=", "--config.eval.at_end=False", *extra]


@pytest.fixture(scope="module")
def results(data, saved_run, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  photo = tmp / "photo.png"
  from PIL import Image
  Image.new("RGB", (40, 30), (200, 10, 10)).save(photo)
  (tmp / "notes.jpg").write_text("not an image")
  empty_workdir = tmp / "never_trained"
  corrupted = str(tmp / "corrupted")
  shutil.copytree(saved_run, corrupted)
  for f in (tmp / "corrupted" / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and "metadata" not in f.name:
      f.write_bytes(b"\0garbage")
  mismatched = str(tmp / "mismatched")   # its own copy: the cases run two at a time, one writer per run
  shutil.copytree(saved_run, mismatched)
  other_src = tmp / "other_source"
  synthetic.write_dataset(str(other_src), prompts=20, seeds=1, size=32, tokenizer=False)
  (tmp / "not_a_release").mkdir()
  edit = lambda *a: {"module": "mgie_jax.edit", "argv": list(a), "forbid": NO_MODELS}
  demo = lambda *a: {"module": "mgie_jax.demo", "argv": list(a), "forbid": NO_MODELS}
  all_bad = tmp / "all_bad.jsonl"
  all_bad.write_text('{"image": "nope.png", "instruction": "x"}\n{"instruction": "y"}\nnot json\n')
  good = [f"--workdir={saved_run}", f"--image={photo}", "--instruction=make it blue"]
  eight = {"XLA_FLAGS": xla_flags(8, ORIGINAL_XLA_FLAGS)}
  train = lambda *a, forbid=NO_MODELS, env=eight: {"module": "mgie_jax.train", "argv": list(a), "forbid": forbid,
                                                  "env": env}
  buildc = lambda *a: {"module": "data_pipelines.build", "argv": list(a), "forbid": NO_MODELS}
  cases = {
      "image_missing": edit(*good[:1], f"--image={tmp / 'nope.jpg'}", "--instruction=x"),
      "image_folder": edit(*good[:1], f"--image={tmp}", "--instruction=x"),
      "image_text": edit(*good[:1], f"--image={tmp / 'notes.jpg'}", "--instruction=x"),
      "instruction_empty": edit(*good[:2], "--instruction=  "),
      "out_folder": edit(*good, f"--out={tmp}"),
      "out_extension": edit(*good, f"--out={tmp / 'edited.txt'}"),
      "no_checkpoint": edit(f"--workdir={empty_workdir}", *good[1:]),
      "both": edit(*good, f"--checkpoint={saved_run}/checkpoints/2"),
      "no_step": edit(*good, "--step=5"),
      "image_flag_missing": edit(good[0], "--instruction=x"),
      "edit_counts": edit(good[0], f"--image={photo}", f"--image={photo}", "--instruction=x"),
      "edit_no_out_dir": edit(*good, f"--image={photo}", "--instruction=y"),
      "manifest_missing": edit(good[0], f"--manifest={tmp / 'nope.jsonl'}", f"--out_dir={tmp / 'o'}"),
      "manifest_all_bad": edit(good[0], f"--manifest={all_bad}", f"--out_dir={tmp / 'o'}"),
      "demo_both": demo(good[0], "--config=configs/eval/base.py"),
      "demo_no_checkpoint": demo(f"--workdir={empty_workdir}"),
      "demo_port": demo(good[0], "--port=-1"),
      "config_key": train(*train_flags(data, tmp / "w1", "--config.train.batchsize=8")),
      "config_value": train(*train_flags(data, tmp / "w2", "--config.train.batch_size=abc")),
      "config_file": train("--config=configs/nope.py", f"--workdir={tmp / 'w3'}"),
      "batch_mesh": train(*train_flags(data, tmp / "w4", "--config.train.batch_size=6")),
      "grad_accum": train(*train_flags(data, tmp / "w5", "--config.train.grad_accum=3")),
      "not_a_dataset": train(*train_flags(data, tmp / "w6", f"--config.data.dir={tmp / 'not_a_release'}")),
      "eval_sampler": train(*train_flags(data, tmp / "w7", "--config.eval.sampler=dpm")),
      "noise": train(*train_flags(data, tmp / "w8", "--config.model.noise.prediction_type=epsilon",
                                  "--config.model.noise.rescale_betas_zero_snr=True")),
      "ema_decay": train(*train_flags(data, tmp / "w9", "--config.train.ema_decay=1.0")),
      "template": train(*train_flags(data, tmp / "w10", "--config.model.template=llava_1_5")),
      "features_trained": train(*train_flags(data, tmp / "w11", f"--config.data.features={tmp}")),
      "finished": train(*train_flags(data, saved_run, "--config.train.steps=6")),
      "mismatch": train(*train_flags(data, mismatched, "--config.train.steps=8",
                                     "--config.model.unet.block_out_channels=(16, 32)"), forbid=[], env={}),
      "damaged": train(*train_flags(data, corrupted, "--config.train.steps=8"), forbid=[], env={}),
      "build_missing_dir": buildc("ipr2pr", f"--manual_dir={tmp / 'nope'}", f"--data_dir={tmp / 'tfds'}",
                                  "--missing_expressive=instruction"),
      "build_not_release": buildc("ipr2pr", f"--manual_dir={tmp / 'not_a_release'}", f"--data_dir={tmp / 'tfds'}",
                                  "--missing_expressive=instruction"),
      "build_no_expressive": buildc("ipr2pr", f"--manual_dir={data[2]}", f"--data_dir={tmp / 'tfds'}"),
      "build_other_source": buildc("ipr2pr", f"--manual_dir={other_src}",
                                   f"--data_dir={os.path.dirname(os.path.dirname(os.path.dirname(data[0])))}",
                                   "--missing_expressive=instruction"),
      "build_no_data_dir": buildc("ipr2pr", f"--manual_dir={data[2]}"),
      **{f"help_{m}": {"module": f"mgie_jax.{m}", "argv": ["--help"], "forbid": NO_MODELS}
         for m in ("train", "edit", "compile", "evaluate", "export", "demo")},
      "help_build": {"module": "data_pipelines.build", "argv": ["ipr2pr", "--help"], "forbid": NO_MODELS},
  }
  out = dict(zip(cases, run_cases(list(cases.values()))))
  out["_paths"] = {"empty_workdir": str(empty_workdir), "corrupted": corrupted, "tmp": str(tmp)}
  return out


def test_edit_input_mistakes(results):
  user_error(results["image_missing"], "--image", "nope.jpg", "does not exist")
  user_error(results["image_folder"], "is a folder")
  user_error(results["image_text"], "notes.jpg", "not a readable image")
  user_error(results["instruction_empty"], "--instruction is empty")
  user_error(results["out_folder"], "--out", "is a folder")
  user_error(results["out_extension"], "unknown image extension '.txt'")
  user_error(results["both"], "exactly one of --workdir and --checkpoint")
  user_error(results["no_step"], "no checkpoint step 5", "steps: 2, 4, 6")
  user_error(results["image_flag_missing"], "--image is required")
  user_error(results["edit_counts"], "--instruction", "1 instructions for 2 images")
  user_error(results["edit_no_out_dir"], "--out_dir", "2 images need a folder")
  user_error(results["manifest_missing"], "--manifest", "does not exist")
  user_error(results["manifest_all_bad"], "no usable line")
  err = results["manifest_all_bad"]["stderr"]
  for n, what in ((1, "nope.png does not exist"), (2, 'no "image" path'), (3, "not JSON")):
    assert re.search(rf"skipped line {n}: .*{re.escape(what)}", err), (n, err)


def test_demo_mistakes(results):
  user_error(results["demo_both"], "--config", "given with a run")
  user_error(results["demo_no_checkpoint"], "no checkpoint in")
  user_error(results["demo_port"], "--port")


def test_edit_is_read_only_and_names_its_own_options(results):
  line = user_error(results["no_checkpoint"], "no checkpoint in", "--checkpoint=")
  assert "never_trained" in line
  assert not os.path.exists(results["_paths"]["empty_workdir"])        # nothing created


def test_train_config_mistakes_before_any_model(results):
  user_error(results["config_key"], "--config.train.batchsize", "no key 'train.batchsize'", "train.batch_size")
  user_error(results["config_value"], "--config.train.batch_size", "abc")
  user_error(results["config_file"], "configs/nope.py", "no such file")
  user_error(results["batch_mesh"], "train.batch_size 6", "data x fsdp = 8", "multiple of 8, e.g. 8")
  user_error(results["grad_accum"], "grad_accum=3")
  user_error(results["not_a_dataset"], "config.data.dir", "no built dataset", "data_pipelines.build")
  user_error(results["eval_sampler"], "--config.eval.sampler", "'dpm'", "euler_ancestral, euler, ddim")
  user_error(results["noise"], "--config.model.noise", "rescale_betas_zero_snr needs prediction_type='v_prediction'")
  user_error(results["ema_decay"], "--config.train.ema_decay", "1.0", "below 1")
  user_error(results["template"], "--config.model.template", "'llava_1_5'", "config.model.init=pretrained")
  user_error(results["features_trained"], "config.trainable 'mllm' trains", "keep them frozen")
  for name in ("config_key", "batch_mesh", "grad_accum", "not_a_dataset", "eval_sampler", "noise", "ema_decay",
               "template", "features_trained"):
    assert results[name]["seconds"] < 30, (name, results[name]["seconds"])     # no model, no compile
  for name in ("w1", "w4", "w5", "w6", "w7", "w8", "w9", "w10", "w11"):
    assert not os.path.exists(os.path.join(results["_paths"]["tmp"], name))   # nothing half-written


def test_a_finished_run_exits_at_once(results):
  r = results["finished"]
  assert r["rc"] == 0, r["stderr"][-2000:]
  assert "already finished (step 6 of 6)" in r["stderr"] and "FORBIDDEN" not in r["stderr"]


def test_restoring_onto_another_model_config_says_what_differs(results):
  line = user_error(results["mismatch"], "checkpoint step 6 does not fit this model", "unet.")
  assert "model.unet.block_out_channels=[32, 64] (now [16, 32])" in line


def test_damaged_checkpoint_lists_intact_steps_and_the_flag(results):
  user_error(results["damaged"], "checkpoint step 6", "cannot be read", "intact earlier steps: 4, 2",
             "--config.checkpoint.restore_step=4")


@pytest.fixture(scope="module")
def restored(data, results, tmp_path_factory):
  """The damaged run, continued as the error line says (it trains, so it is in the slow tier)."""
  restored = str(tmp_path_factory.mktemp("restored") / "run")
  shutil.copytree(results["_paths"]["corrupted"], restored)
  case = {"module": "mgie_jax.train", "argv": train_flags(data, restored, "--config.train.steps=7",
                                                          "--config.log.every=1", "--config.checkpoint.restore_step=4")}
  return restored, run_cases([case])[0]


@pytest.mark.slow
def test_restore_step_continues_from_an_intact_step_and_sets_the_newer_aside(restored):
  workdir, r = restored
  assert r["rc"] == 0, r["stderr"][-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(l)["step"] for l in f]
  assert steps == [5, 6, 7]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "7"]
  aside = os.listdir(os.path.join(workdir, "checkpoints.superseded"))
  assert len(aside) == 1 and aside[0].startswith("6.")                 # moved aside, not deleted


@pytest.mark.slow
def test_log_lines_are_not_printed_over_the_progress_bar(restored):
  err = restored[1]["stderr"]
  segments = [s for s in re.split(r"[\r\n]", err) if "mgie_jax.train: step" in s]
  assert len(segments) == 3
  assert "\r" not in err and not re.search(r"train:\s+\d+%", err)    # stderr is a file: no bar
  for s in segments:       # each log line starts its own line, not glued to the bar's text
    assert re.match(r"\s*\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", s), s


def test_help_exits_0_for_every_command(results):
  for name in [k for k in results if k.startswith("help_")]:
    r = results[name]
    assert r["rc"] == 0 and "Traceback" not in r["stderr"], (name, r["stderr"][-2000:])
    assert "--" in r["stdout"] + r["stderr"], (name, r)            # it printed the flags
  build_help = results["help_build"]["stdout"]
  for flag in ("--prompts", "--seeds", "--size", "--seed"):
    line = next(l for l in build_help.splitlines() if l.strip().startswith(flag))
    assert len(line.split()) > 2, line                          # each flag has help text
  assert "seeds.json" in build_help and "prompt.json" in build_help


def test_build_mistakes(results, data):
  user_error(results["build_missing_dir"], "--manual_dir", "does not exist")
  user_error(results["build_not_release"], "not an IPr2Pr folder release")
  user_error(results["build_no_expressive"], "no --expressive file", "--missing_expressive=instruction")
  user_error(results["build_other_source"], "was built from", "--overwrite")
  user_error(results["build_no_data_dir"], "--data_dir")
  # The dataset the refused rebuild named is intact.
  import tensorflow_datasets as tfds
  assert tfds.builder_from_directory(data[0]).info.splits["train"].num_examples > 0


def test_readme_common_errors_section_is_generated_from_the_messages():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert errors.markdown() in readme, "regenerate it with: python -m mgie_jax.core.errors"


def test_no_libtpu_start_up_noise_without_a_tpu(tmp_path):
  """libtpu is installed ([test]); this machine has no TPU: JAX starts without the TPU client."""
  from mgie_jax.core import backends
  assert backends.tpu_chips() == 0
  e = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, "-c", "import mgie_jax, jax; print(jax.devices()[0].platform)"],
                        env=e, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "cpu", proc.stderr[-2000:]
  assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr[-2000:]
  fake = tmp_path / "pci"
  (fake / "0000:00:04.0").mkdir(parents=True)
  (fake / "0000:00:04.0" / "vendor").write_text("0x1ae0\n")
  assert backends.tpu_chips(str(fake)) == 1


def test_commands_and_only_commands_re_run_with_huge_pages():
  from mgie_jax.core import hugepages
  on = dict(thp="madvise", glibc=True)
  py = sys.executable
  for argv in ([py, "-m", "mgie_jax.train", "--config=c.py"], [py, "-u", "-m", "mgie_jax.edit"]):
    env = hugepages.environment(argv, {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, **on)
    assert env["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:glibc.malloc.hugetlb=1", argv
  for argv in ([py, "-m", "pytest"], [py, "-c", "import mgie_jax"], [py, "bench.py"], [py, "-m", "data_pipelines.build"]):
    assert hugepages.environment(argv, {}, **on) is None, argv          # library users keep their process
  argv = [py, "-m", "mgie_jax.train"]
  assert hugepages.environment(argv, {"MGIE_JAX_HUGEPAGES": "0"}, **on) is None       # the opt-out
  assert hugepages.environment(argv, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **on) is None
  assert hugepages.environment(argv, {}, thp="never", glibc=True) is None
  assert hugepages.environment(argv, {}, thp="always", glibc=True) is None     # the kernel does it already
  assert hugepages.environment(argv, {}, thp="madvise", glibc=False) is None
  calls = []
  hugepages.reexec_with_huge_pages(argv, {}, execve=lambda *a: calls.append(a))
  assert calls == ([] if hugepages.environment(argv, {}) is None else
                   [(py, [py, "-m", "mgie_jax.train"], hugepages.environment(argv, {}))])


def test_huge_pages_cut_the_page_faults_of_a_large_step(tmp_path):
  """What the tunable is for: a step whose 512 MB temporaries are fresh mappings on every call
  first-touches them 4 KiB at a time; with huge pages (where this machine has them) 2 MiB."""
  from mgie_jax.core import hugepages
  argv = [sys.executable, "-m", "mgie_jax.train"]
  env = hugepages.environment(argv, {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
  if env is None:
    pytest.skip("THP is not in madvise mode or glibc < 2.35 here: the commands do not re-run themselves")
  code = ("import resource, jax, jax.numpy as jnp\n"
          "f = jax.jit(lambda p, g: p - 1e-3 * (jnp.tanh(g) * 2.0 + p))\n"
          "p = g = jnp.ones(2 ** 27); f(p, g).block_until_ready()\n"
          "r = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
          "for _ in range(4): f(p, g).block_until_ready()\n"
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r)\n")
  faults = {}
  for name, e in (("4k", {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}), ("huge", env)):
    proc = subprocess.run([sys.executable, "-c", code], env={**e, "JAX_PLATFORMS": "cpu"}, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    faults[name] = int(proc.stdout.split()[-1])
  # 4 calls x 512 MB of output at 4 KiB is 500k faults; at 2 MiB about 1k.
  assert faults["4k"] > 100_000 and faults["huge"] < faults["4k"] / 20, faults
