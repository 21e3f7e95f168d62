"""`python -m mgie_jax.edit` on a tiny run: photos at their own size, the square crop as before,
batched manifests with a bad line, and a killed batch re-run."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import ORIGINAL_XLA_FLAGS, xla_flags
from mgie_jax.core.images import open_rgb
from mgie_jax.inference import pipeline as inference
from mgie_jax.run import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow          # each case loads the run in a fresh process
STEPS = ["--steps=3", "--max_new_tokens=8"]


def env():
  return dict(os.environ, XLA_FLAGS=xla_flags(1, ORIGINAL_XLA_FLAGS),
              PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def edit(*argv):
  out = subprocess.run([sys.executable, "-m", "mgie_jax.edit", *argv, *STEPS], capture_output=True, text=True,
                       cwd=ROOT, env=env(), timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def photo(path, w, h, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR).save(path)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
  """6 lines, line 4 names a missing image; two shapes, so batches are by shape."""
  tmp = tmp_path_factory.mktemp("manifest")
  sizes = [(640, 360), (300, 900), (640, 360), None, (640, 360), (300, 900)]
  rows = []
  for i, size in enumerate(sizes):
    if size:
      photo(tmp / f"im{i}.png", *size, i)
    rows.append({"image": f"im{i}.png", "instruction": ["make it blue", "add a circle", "remove the square"][i % 3]})
  path = tmp / "edits.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path), sizes


def texts_of(stdout):
  return dict(re.findall(r"^(line \d+): expressive instruction: (.*)$", stdout, re.M))


@pytest.fixture(scope="module")
def one_by_one(saved_run, manifest, tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("one_by_one"))
  r = edit(f"--workdir={saved_run}", f"--manifest={manifest[0]}", f"--out_dir={out_dir}", "--batch_size=1")
  return out_dir, r


def outputs(out_dir):
  return {f: np.asarray(Image.open(os.path.join(out_dir, f))) for f in sorted(os.listdir(out_dir)) if ".tmp" not in f}


def test_a_manifest_with_a_bad_line_writes_the_rest_at_their_sizes(one_by_one, manifest):
  out_dir, r = one_by_one
  assert re.search(r"skipped line 4: .*im3.png does not exist", r.stderr), r.stderr
  assert "edited 5, already written 0, skipped 1 bad line" in r.stdout
  got = outputs(out_dir)
  assert sorted(got) == [f"im{i}.png" for i in (0, 1, 2, 4, 5)]
  for i in (0, 1, 2, 4, 5):
    w, h = manifest[1][i]
    assert got[f"im{i}.png"].shape == (h, w, 3)
  assert len(texts_of(r.stdout)) == 5


def test_a_killed_batch_rerun_writes_only_the_rest_equal_to_one_by_one(saved_run, manifest, one_by_one, tmp_path):
  out_dir = str(tmp_path / "batched")
  argv = [sys.executable, "-m", "mgie_jax.edit", f"--workdir={saved_run}", f"--manifest={manifest[0]}",
          f"--out_dir={out_dir}", "--batch_size=2", *STEPS]
  proc = subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while time.time() < deadline and len(outputs(out_dir) if os.path.isdir(out_dir) else []) < 2:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)                 # after the first batch (2 edits of one shape)
  first_out, _ = proc.communicate()
  first = {f: os.stat(os.path.join(out_dir, f)).st_mtime_ns for f in outputs(out_dir)}
  assert 2 <= len(first) < 5
  r = edit(*argv[3:-len(STEPS)])
  assert f"already written {len(first)}" in r.stdout and f"edited {5 - len(first)}," in r.stdout
  for f, mtime in first.items():                   # finished work is never redone
    assert os.stat(os.path.join(out_dir, f)).st_mtime_ns == mtime
  want, got = outputs(one_by_one[0]), outputs(out_dir)
  assert sorted(got) == sorted(want)
  texts = {**texts_of(first_out), **texts_of(r.stdout)}
  assert texts == texts_of(one_by_one[1].stdout)
  for f in want:   # each row's own noise; batches of 2 and of 1 round differently in float32 (a level)
    assert np.abs(got[f].astype(int) - want[f]).max() <= 2, f


def test_one_image_equals_its_manifest_row_and_square_crop_equals_the_edit_as_before(saved_run, manifest,
                                                                                     one_by_one, tmp_path):
  image = os.path.join(os.path.dirname(manifest[0]), "im1.png")
  r = edit(f"--workdir={saved_run}", f"--image={image}", "--instruction=add a circle", "--seed=1",
           f"--out={tmp_path / 'one.png'}")
  assert "edited image (300x900, checkpoint step 6)" in r.stdout
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one.png")), outputs(one_by_one[0])["im1.png"])
  # --crop=square: MGIE's centre square at the run's resolution, as edit wrote it before.
  r = edit(f"--workdir={saved_run}", f"--image={image}", "--instruction=add a circle", "--crop=square",
           f"--out={tmp_path / 'square.png'}")
  workdir, step = workdir_lib.locate(saved_run)
  run = workdir_lib.load(workdir, step, devices=jax.devices()[:1])
  with jax.set_mesh(run.mesh):
    want, texts = inference.edit(run.model, run.tok, [open_rgb(image)], ["add a circle"], key=jax.random.key(0),
                                 resolution=32, steps=3, max_new_tokens=8)
  assert f"expressive instruction: {texts[0]}" in r.stdout
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "square.png")), want[0])


def test_a_second_edit_of_the_run_compiles_nothing(saved_run, manifest, tmp_path):
  # The default cache, not the suite's shared one: the user's cache folder, which edit uses so that
  # it never writes into the run.
  e = {k: v for k, v in env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
  e["XDG_CACHE_HOME"] = str(tmp_path / "user_cache")
  cache = tmp_path / "user_cache" / "mgie_jax" / "compile_cache"
  image = os.path.join(os.path.dirname(manifest[0]), "im1.png")
  entries, images = [], []
  run_files = sorted(str(p) for p in pathlib.Path(saved_run).rglob("*"))
  for i in range(2):
    out = tmp_path / f"edit{i}.png"
    subprocess.run([sys.executable, "-m", "mgie_jax.edit", f"--workdir={saved_run}", f"--image={image}",
                    "--instruction=add a circle", f"--out={out}", *STEPS], cwd=ROOT, env=e, check=True,
                   capture_output=True, timeout=900)
    entries.append(sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache")))
    images.append(np.asarray(Image.open(out)))
  assert len(entries[0]) > 20, entries[0]            # the first edit compiled (and cached) its programs
  assert entries[1] == entries[0]                    # the second compiled none: every one came from the cache
  np.testing.assert_array_equal(images[1], images[0])
  assert run_files == sorted(str(p) for p in pathlib.Path(saved_run).rglob("*"))   # nothing written into the run
