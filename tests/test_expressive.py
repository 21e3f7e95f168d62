"""The expressive-instruction annotation command on a small IPr2Pr release with tiny random LLaVA v1
+ T5 folders: well-formed output keyed as the ipr2pr builder joins it, early stopping equal to a
full-length decode, kill + restart and two hosts equal to one uninterrupted run, bad images counted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ORIGINAL_XLA_FLAGS, xla_flags
from expressive_fixtures import make_llava_v1, make_t5
from mgie_jax.inference import annotate as annotation

pytestmark = pytest.mark.slow      # the fast tier (-m 'not slow') leaves these out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(devices: int = 1) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices, ORIGINAL_XLA_FLAGS)}


def test_clean_follows_the_notebook():
  # Text after "ASSISTANT:" (decoded without </s>): two '.'-pieces re-joined without spaces, a final '.'.
  assert annotation.clean(" The sky will be blue. The grass stays green. Birds fly.") == \
      "The sky will be blue.The grass stays green."
  assert annotation.clean("It becomes brighter, an Alternative is to dim it. More") == "It becomes brighter, an."
  assert annotation.clean("One sentence only") == "One sentence only."
  assert annotation.clean("Warm light [IMG0] [IMG1]") == "Warm light."
  assert annotation.clean("   ") is None
  # decided: nothing later can change the kept text
  assert annotation.decided("A. B.", False) and annotation.decided("alTernative", False)
  assert annotation.decided("x", True) and not annotation.decided("A. B", False)


def test_summarizer_settings_read_the_folder(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"task_specific_params": {"summarization": {"length_penalty": 2.0, "early_stopping": True,
                                                          "prefix": "summarize: ", "num_beams": 4,
                                                          "max_length": 200}}}, f)
  s = annotation.SummarizerSettings.from_folder(str(tmp_path))
  assert (s.length_penalty, s.early_stopping, s.prefix) == (2.0, True, "summarize: ")
  assert (s.num_beams, s.min_length, s.max_length, s.no_repeat_ngram_size) == (5, 5, 64, 3)   # the notebook's


@pytest.fixture(scope="module")
def release(tmp_path_factory, clip_dir):
  """12 pairs in the IPr2Pr folder layout (one input image corrupted), LLaVA v1, T5 summariser."""
  from data_pipelines import synthetic
  root = tmp_path_factory.mktemp("expressive")
  src = str(root / "src")
  synthetic.write_dataset(src, prompts=6, seeds=2, size=64, seed=0)
  with open(os.path.join(src, "seeds.json")) as f:
    folder, seeds = json.load(f)[2]
  with open(os.path.join(src, folder, f"{seeds[1]}_0.jpg"), "r+b") as f:
    f.truncate(300)
  llava = make_llava_v1(str(root / "llava"), clip_dir[0], os.path.join(src, "tokenizer"))
  t5, _ = make_t5(str(root / "t5"), task_params={"length_penalty": 2.0, "early_stopping": True})
  return {"root": root, "src": src, "llava": llava, "t5": t5, "bad": f"{folder}_{seeds[1]}_0"}


def command(release, out, *extra):
  return [sys.executable, "-m", "data_pipelines.expressive", f"--source={release['src']}",
          f"--llava={release['llava']}", f"--summarizer={release['t5']}", f"--out={out}", "--dtype=float32",
          "--batch_size=2", "--max_new_tokens=128", "--chunk=16", *extra]


def run(cmd):
  return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def tokens(out):
  from data_pipelines.expressive import read_parts
  return sum(r.get("llava_tokens", 0) for r in read_parts(out + ".parts").values())


@pytest.fixture(scope="module")
def runs(release):
  """One uninterrupted run and one decoding every answer to the end, side by side."""
  root = release["root"]
  outs = {"plain": str(root / "plain.json"), "full": str(root / "full.json")}
  procs = {"plain": subprocess.Popen(command(release, outs["plain"]), cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env()),
           "full": subprocess.Popen(command(release, outs["full"], "--no_early_stop"), cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=env())}
  results = {k: p.communicate(timeout=600) for k, p in procs.items()}
  for k, p in procs.items():
    assert p.returncode == 0, results[k][1][-2000:]
  return outs, {k: json.loads(v[0].strip().splitlines()[-1]) for k, v in results.items()}


def test_output_is_keyed_for_the_builder_and_counts_bad_images(release, runs):
  outs, summaries = runs
  with open(outs["plain"]) as f:
    table = json.load(f)
  with open(os.path.join(release["src"], "seeds.json")) as f:
    keys = [f"{folder}_{s}_0" for folder, seeds in json.load(f) for s in seeds]
  assert list(table) == [k for k in keys if k != release["bad"]]
  for key, rec in table.items():
    with open(os.path.join(release["src"], key.split("_")[0], "prompt.json")) as f:
      assert rec["instruction"] == json.load(f)["edit"]
    assert isinstance(rec["expressive"], str) and rec["expressive"].strip()
  assert summaries["plain"]["annotated"] == 11
  assert sum(summaries["plain"]["skipped"].values()) == 1     # the truncated JPEG, by its reason


def test_early_stopping_gives_the_full_decode_text(runs):
  outs, _ = runs
  with open(outs["plain"], "rb") as a, open(outs["full"], "rb") as b:
    assert a.read() == b.read()
  assert tokens(outs["plain"]) < 0.8 * tokens(outs["full"])      # and it did stop early


def test_kill_and_restart_gives_the_same_file(release, runs):
  outs, _ = runs
  out = str(release["root"] / "killed.json")
  proc = subprocess.Popen(command(release, out, "--batch_size=1"), cwd=ROOT, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  part = os.path.join(out + ".parts", "part-00000.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(part) and open(part).read().count("\n") >= 2):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done_at_kill = open(part).read().count("\n")
  assert 2 <= done_at_kill < 12 and not os.path.exists(out)
  with open(part, "a") as f:
    f.write('{"key": "torn')                          # a line cut by the kill
  r = run(command(release, out))
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"{12 - done_at_kill} to annotate" in r.stderr
  with open(out, "rb") as a, open(outs["plain"], "rb") as b:
    assert a.read() == b.read()


def test_two_hosts_give_the_same_file_as_one(release, runs):
  """Two hosts, one of them with two devices, write the same merged file as one host."""
  outs, _ = runs
  out = str(release["root"] / "two.json")
  # Host 0 has two (simulated) devices: parameters FSDP-sharded, the batch split over them.
  envs = [env(2), env(1)]
  procs = [subprocess.Popen(command(release, out, f"--host_index={i}", "--host_count=2"), cwd=ROOT, env=envs[i],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  errs = [p.communicate(timeout=600)[1] for p in procs]
  assert all(p.returncode == 0 for p in procs), errs
  assert all("6 to annotate" in e for e in errs)
  assert sorted(os.listdir(out + ".parts")) == ["part-00000.jsonl", "part-00001.jsonl"]
  with open(out, "rb") as a, open(outs["plain"], "rb") as b:
    assert a.read() == b.read()


def test_builder_joins_the_file_and_counts_the_rest(release, runs, tmp_path):
  """Annotate the first 6 pairs only; the ipr2pr builder takes those and counts the others."""
  from data_pipelines.ipr2pr import build
  from data_pipelines.loader import open_source
  out = str(release["root"] / "first6.json")
  r = run(command(release, out, "--limit=6"))
  assert r.returncode == 0, r.stderr[-2000:]
  with open(out) as f:
    table = json.load(f)
  assert len(table) == 5                             # the 6th pair is the corrupted one
  builder = build(release["src"], str(tmp_path), "folder", out, "instruction")
  seen = {}
  for split in builder.info.splits:
    source = open_source(builder.data_dir, split)
    for i in range(len(source)):
      rec = source[i]
      key = rec["key"].decode() if isinstance(rec["key"], bytes) else rec["key"]
      seen[key] = rec["expressive"].decode() if isinstance(rec["expressive"], bytes) else rec["expressive"]
  assert set(table) <= set(seen)
  for key, rec in table.items():
    assert seen[key] == rec["expressive"]
  meta = dict(builder.info.metadata)
  fallback = sum(notes.get("expressive_fallback", 0) for notes in meta["notes"].values())
  assert fallback == len(seen) - len(table) == 6, meta
  # The built dataset is a source too: the same annotations for the pairs it kept.
  out_built = str(release["root"] / "from_built.json")
  r = run(command(release, out_built, f"--source={builder.data_dir}"))
  assert r.returncode == 0, r.stderr[-2000:]
  with open(out_built) as f, open(runs[0]["plain"]) as g:
    from_built, plain = json.load(f), json.load(g)
  assert set(from_built) == set(seen) and all(from_built[k] == plain[k] for k in from_built)


def test_mistakes_are_one_line_exit_2(release, tmp_path):
  bad = run(command(release, str(tmp_path / "x.json"), "--llava=/nowhere"))     # the last value wins
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--llava /nowhere" in bad.stderr
  bad = run(command(release, str(tmp_path / "x.json"), f"--summarizer={release['llava']}"))
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "spiece.model" in bad.stderr
