"""launch/tpu_pod.sh: every argument reaches the trainer on every worker exactly as given, and
the code is copied to the workers (here gcloud, python and pip are stand-ins that record calls)."""

import json
import os
import stat
import subprocess
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECORD = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["CALLS"], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


def stand_in(folder, name, body=RECORD):
  path = folder / name
  path.write_text(body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_tpu_pod_passes_arguments_safely_and_copies_the_code(tmp_path):
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  bin_dir.mkdir()
  home.mkdir()
  for name in ("gcloud", "python", "pip"):
    stand_in(bin_dir, name)
  calls = tmp_path / "calls.jsonl"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls), HOME=str(home))
  tricky = ["--config.data.dir=/data/with space/ipr2pr", "--config.log.every=5",
            "--config.note=it's \"quoted\" $HOME; rm -rf /"]
  subprocess.run([os.path.join(ROOT, "launch", "tpu_pod.sh"), "my-tpu", "us-central2-b", "gs://bucket/run 1",
                  *tricky], env=env, check=True, cwd=tmp_path, timeout=120)
  rows = [json.loads(l) for l in calls.read_text().splitlines()]
  scp, ssh = rows[0], rows[1]
  assert scp[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and scp[4] == "scp" and "--worker=all" in scp
  with tarfile.open(scp[5]) as bundle:
    names = bundle.getnames()
  assert "./mgie_jax/train.py" in names and not any("/.git/" in n or n.endswith("/.git") for n in names)
  assert ssh[4] == "ssh" and "--worker=all" in ssh
  remote = ssh[ssh.index("--command") + 1]
  # Run the remote command here, as a worker's bash would, with the bundle unpacked in ~.
  os.replace(scp[5], home / "mgie_jax.tgz")
  subprocess.run(["bash", "-c", remote], env=env, check=True, cwd=home, timeout=120)
  rows = [json.loads(l) for l in calls.read_text().splitlines()]
  python_calls = [r for r in rows[2:] if r[0] == "python"]
  assert python_calls[0][1:5] == ["-m", "pip", "install", "-q"]
  assert python_calls[-1][1:] == ["-m", "mgie_jax.train", "--config=configs/ipr2pr.py",
                                  "--workdir=gs://bucket/run 1", *tricky]
  assert (home / "mgie_jax" / "mgie_jax" / "train.py").exists()
