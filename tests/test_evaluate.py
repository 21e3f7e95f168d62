"""The evaluation sweep: a killed sweep resumes to the same numbers, rows do not depend on batch
size or host count, the MLLM part runs once per example across the grid, the copy-the-input row
is exact, MagicBrush's multi-turn setting feeds each turn the previous edit, and the command
writes its table, CSV and plots."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import ORIGINAL_XLA_FLAGS, xla_flags
from configs import tiny
from data_pipelines import synthetic
from data_pipelines.ipr2pr import build
from mgie_jax.run import model as build_lib
from mgie_jax.evaluation import editors as ed
from mgie_jax.evaluation import metrics as metrics_lib
from mgie_jax.evaluation.sweep import Results, Setting, Sweep, load_examples
from mgie_jax.core.images import decode_rgb
from mgie_jax.models.mgie import MGIE
from mgie_jax.text import LlamaTokenizer

pytestmark = pytest.mark.slow      # the fast tier (-m 'not slow') leaves these out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("eval_data"))
  synthetic.write_dataset(root, prompts=40, seeds=1, size=32)
  builder = build(root, os.path.join(root, "tfds"), "folder", os.path.join(root, "expressive.json"))
  return str(builder.data_dir), os.path.join(root, "tokenizer")


@pytest.fixture(scope="module")
def editor(data):
  c = tiny.get_config()
  # SD's schedule (Euler starts at sigma 14.6): with zero terminal SNR it starts at 4096, and this
  # random model's batch-shape-dependent float32 rounding then reaches ~1e-5 in SSIM.
  c.model.noise.rescale_betas_zero_snr = False
  tok = LlamaTokenizer.from_pretrained(data[1])
  model = MGIE(build_lib.random_config(c, tok), rngs=nnx.Rngs(0))
  return ed.MGIEEditor("tiny", model, tok, step=7, resolution=32, max_new_tokens=4)


SETTINGS = [Setting(t, 1.5, s, "euler_ancestral", 3, 32) for t in (1.0, 4.0) for s in (0, 1)]


def run(examples, editors, tmp, batch_size=2, mode="single", process=0, processes=1, stop_after=None):
  metrics = metrics_lib.make_metrics(["l1", "ssim"])
  results = Results(tmp, process)

  class Bar:
    n = 0

    def update(self, k):
      self.n += k
      if stop_after is not None and self.n >= stop_after:
        raise KeyboardInterrupt("killed")
  sweep = Sweep(editors, SETTINGS, metrics, results, batch_size, mode, process=process, processes=processes)
  try:
    sweep.run(examples, Bar())
  except KeyboardInterrupt:
    pass
  return {Results.row_id(r): r for r in Results.read(tmp)}


def same(a, b, tol=1e-5):
  assert a.keys() == b.keys()
  for k in a:
    for m in ("l1", "ssim"):
      assert abs(a[k][m] - b[k][m]) <= tol, (k, m, a[k][m], b[k][m])
    assert a[k]["expressive"] == b[k]["expressive"]


def test_resume_batch_size_and_hosts_give_the_same_rows(data, editor, tmp_path):
  examples = load_examples(data[0], "train")[:5]
  whole = run(examples, [editor], tmp_path / "whole")
  assert len(whole) == 5 * len(SETTINGS)
  # Killed part-way, then the same sweep again: skips what is done, ends with the same rows.
  partial = run(examples, [editor], tmp_path / "killed", stop_after=7)
  assert 0 < len(partial) < len(whole)
  same(run(examples, [editor], tmp_path / "killed"), whole)
  # Another batch size, and two hosts each taking their share, give the same rows.
  same(run(examples, [editor], tmp_path / "batch3", batch_size=3), whole)
  for p in (0, 1):
    run(examples, [editor], tmp_path / "hosts", process=p, processes=2)
  files = sorted(os.listdir(tmp_path / "hosts"))
  assert files == ["results.p0.jsonl", "results.p1.jsonl"]
  same({Results.row_id(r): r for r in Results.read(tmp_path / "hosts")}, whole)


def test_the_mllm_part_runs_once_per_example_across_the_grid(data, editor, tmp_path):
  examples = load_examples(data[0], "train")[:4]
  calls = []

  class Counting(ed.MGIEEditor):
    def conditions(self, images, instructions, references=None):
      calls.append(len(images))
      return super().conditions(images, instructions, references)
  counting = Counting("tiny", editor.model, editor.tok, step=7, resolution=32, max_new_tokens=4)
  run(examples, [counting], tmp_path, batch_size=2)
  assert calls == [2, 2]            # 2 batches, whatever the 4 settings


def test_reference_text_conditions_as_training_sees_it(data, editor):
  """expressive="reference": the condition is the one the training loss computes for the
  reference expressive instruction (right-padded batch, no positions), and it reads the text."""
  from mgie_jax.inference import pipeline as inference
  from mgie_jax.text import pad_batch, training_example
  model, tok = editor.model, editor.tok
  exs = load_examples(data[0], "train")[:3]
  _, clip = inference.prepare([decode_rgb(e.input_image) for e in exs], 32, model.config.clip_size)
  instructions, refs = [e.instruction for e in exs], [e.expressive for e in exs]
  assert all(refs) and len(set(refs)) == 3
  texts, cond, null = inference.reference_conditions(model, tok, clip, instructions, refs)
  assert texts == refs
  rows = [training_example(tok, i, r, num_image_tokens=model.config.llava.num_image_tokens, max_length=10 ** 6)
          for i, r in zip(instructions, refs)]
  ids, mask = pad_batch([r.input_ids for r in rows], max(len(r.input_ids) for r in rows), pad_id=0)
  out = model.mllm(ids, clip, attention_mask=mask)
  want, want_null = model.conditions(out.hidden_states, ids)
  np.testing.assert_allclose(np.asarray(cond), np.asarray(want), atol=2e-5)
  np.testing.assert_allclose(np.asarray(null), np.asarray(want_null), atol=2e-5)
  _, swapped, _ = inference.reference_conditions(model, tok, clip, instructions, refs[1:] + refs[:1])
  assert np.abs(np.asarray(swapped) - np.asarray(cond)).max() > 1e-3


def test_reference_rows_carry_the_dataset_text(data, editor, tmp_path):
  examples = load_examples(data[0], "train")[:2]
  ref = ed.MGIEEditor("tiny", editor.model, editor.tok, step=7, resolution=32, max_new_tokens=4, text="reference")
  rows = run(examples, [ref], tmp_path, batch_size=2)
  by_key = {e.key: e.expressive for e in examples}
  assert len(rows) == 2 * len(SETTINGS)
  for r in rows.values():
    assert r["editor"] == "tiny+reference@7" and r["expressive"] == by_key[r["key"]] and r["exp_exact"] == 1.0
  with pytest.raises(ValueError, match="reference expressive instruction"):
    ref.conditions([decode_rgb(examples[0].input_image)], [examples[0].instruction], [""])


def test_reference_text_needs_every_reference():
  from mgie_jax.core import errors
  from mgie_jax.evaluation.campaign import check_references
  from mgie_jax.evaluation.sweep import Example
  exs = [Example("a", "a", 0, b"", b"", "make it blue", "", "x"), Example("b", "b", 0, b"", b"", "make it red", "", "")]
  check_references(exs, "written")
  with pytest.raises(errors.UserError, match="1 of 2 examples have no reference"):
    check_references(exs, "reference")


def test_copy_input_row_is_exact(data, tmp_path):
  examples = load_examples(data[0], "train")
  rows = run(examples, [ed.CopyInput()], tmp_path)
  from mgie_jax.evaluation.report import summarize
  (row,) = summarize(list(rows.values()), ["l1"])
  want = np.mean([np.abs(np.asarray(decode_rgb(e.input_image), np.float64) / 255
                         - np.asarray(decode_rgb(e.target_image), np.float64) / 255).mean() for e in examples])
  assert row["name"] == "copy-input" and row["examples"] == len(examples)
  assert abs(row["l1"] - want) <= 1e-6


def test_multi_turn_feeds_each_turn_the_previous_edit(data, editor, tmp_path):
  """Sessions of 2 and 3 turns: the final turn is scored; copy-input ends at the session's input."""
  from mgie_jax.evaluation.sweep import Example
  base = load_examples(data[0], "train")[:5]
  sessions = [("s1", base[:2]), ("s2", base[2:5])]
  examples = [Example(f"{sid}_{t + 1}", sid, t + 1, e.input_image, e.target_image, e.instruction, "")
              for sid, es in sessions for t, e in enumerate(es)]
  rows = run(examples, [ed.CopyInput(), editor], tmp_path, mode="multi")
  copy = {r["session"]: r for r in rows.values() if r["name"] == "copy-input"}
  assert {r["key"] for r in copy.values()} == {"s1_2", "s2_3"} and copy["s2"]["turns"] == 3
  first, final = decode_rgb(sessions[1][1][0].input_image), decode_rgb(sessions[1][1][-1].target_image)
  want = np.abs(np.asarray(first, np.float64) / 255 - np.asarray(final, np.float64) / 255).mean()
  assert abs(copy["s2"]["l1"] - want) <= 1e-6
  edits = [r for r in rows.values() if r["name"] == "tiny"]
  assert len(edits) == 2 * len(SETTINGS)
  # The chain really is iterative: feeding turn 2 the ground-truth input gives another final edit.
  single = run(examples, [editor], tmp_path / "single", mode="single")
  chained = {(r["setting"], r["key"]): r["l1"] for r in edits}
  independent = {(r["setting"], r["key"]): r["l1"] for r in single.values()}
  assert any(abs(chained[k] - independent[k]) > 1e-4 for k in chained)


def test_the_command_writes_table_csv_and_plots(data, tmp_path):
  """`python -m mgie_jax.evaluate` on a checkpoint of a tiny run: the guidance grid, two seeds."""
  import jax
  from mgie_jax.training.checkpoint import Checkpointer
  from mgie_jax.training.setup import make_setup
  c = tiny.get_config()
  c.data.dir, c.data.tokenizer = data
  c.pretrained.vae = ""
  workdir = str(tmp_path / "run")
  state, _ = make_setup(c, data[1], devices=jax.devices()[:1]).new_state()
  for step in (3, 6):
    ckpt = Checkpointer(workdir, every=1, keep=5, async_save=False)
    ckpt.save(step, state, None, json.loads(c.to_json_best_effort()), force=True)
    ckpt.close()
  out = str(tmp_path / "eval")
  cmd = [sys.executable, "-m", "mgie_jax.evaluate", "--config=configs/eval/base.py", f"--workdir={out}",
         f"--config.dataset.dir={data[0]}", "--config.dataset.name=synthetic", "--config.dataset.limit=3", "--config.dataset.split=train",
         f"--config.runs={workdir}", "--config.steps=3,6", "--config.text_scales=1,4", "--config.seeds=0",
         "--config.sample_steps=2", "--config.metrics=l1,ssim", "--config.plot=l1,ssim", "--config.save_images=True"]
  env = dict(os.environ, XLA_FLAGS=xla_flags(1, ORIGINAL_XLA_FLAGS))
  res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  table = open(os.path.join(out, "table.md")).read()
  assert "| copy-input | single | — |" in table and "| run@6 | single | 4 / 1.5 |" in table
  rows = Results.read(out)
  assert len(rows) == 3 + 3 * 2 * 2
  csv = open(os.path.join(out, "summary.csv")).read().splitlines()
  assert len(csv) == 1 + 1 + 2 * 2
  for png in ("ssim_vs_l1.png", "l1_vs_step.png", "ssim_vs_step.png"):
    with Image.open(os.path.join(out, "plots", png)) as im:
      assert im.size[0] > 300
  assert len(os.listdir(os.path.join(out, "images", "run@6", "single", "t4_i1.5_s0_euler_ancestral2_r0"))) == 3
  bad = subprocess.run(cmd[:-1] + ["--config.metrics=l1,clip_i"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and "metric_models.clip" in bad.stderr and "Traceback" not in bad.stderr
  bad = subprocess.run(cmd[:-1] + ["--config.expressive=oracle"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and "--config.expressive" in bad.stderr and "Traceback" not in bad.stderr
