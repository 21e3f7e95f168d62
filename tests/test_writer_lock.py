"""The run's writer lock: one live writer; claims of dead or silent writers do not block."""

import json
import os
import subprocess
import sys
import time

import pytest

from mgie_jax.core import errors
from mgie_jax.training import writer_lock
from mgie_jax.training.writer_lock import WriterLock


def claim_file(workdir, name, **claim):
  folder = os.path.join(workdir, writer_lock.FOLDER)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, name), "w") as f:
    json.dump(claim, f)
  return os.path.join(folder, name)


def test_a_live_writer_blocks_and_release_lets_the_next_in(tmp_path):
  first = WriterLock(tmp_path).acquire()
  with pytest.raises(errors.UserError) as e:
    WriterLock(tmp_path).acquire()
  assert e.value.code == "run_locked" and f"pid {os.getpid()}" in str(e.value)
  assert len(os.listdir(tmp_path / writer_lock.FOLDER)) == 1     # the refused claim is gone
  first.release()
  assert os.listdir(tmp_path / writer_lock.FOLDER) == []
  with WriterLock(tmp_path):
    pass


def test_claims_of_dead_processes_here_and_silent_machines_are_stale(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  boot = writer_lock._boot_id()
  assert boot, "this test needs Linux's boot id"
  stale_here = claim_file(tmp_path, "1-here.json", host="here", pid=dead.pid, started=1.0, boot_id=boot,
                          heartbeat=time.time())
  stale_there = claim_file(tmp_path, "2-there.json", host="there", pid=1, started=2.0, boot_id="other",
                           heartbeat=time.time() - writer_lock.LEASE_S - 1)
  with WriterLock(tmp_path):
    assert not os.path.exists(stale_here) and not os.path.exists(stale_there)


def test_a_fresh_claim_from_another_machine_blocks(tmp_path):
  claim_file(tmp_path, "3-there.json", host="there", pid=7, started=3.0, boot_id="other", heartbeat=time.time())
  with pytest.raises(errors.UserError, match=r"host there, pid 7"):
    WriterLock(tmp_path).acquire()


def test_a_reused_pid_is_not_the_old_writer(tmp_path):
  me = os.getpid()
  claim_file(tmp_path, "4-me.json", host="here", pid=me, started=4.0, boot_id=writer_lock._boot_id(),
             start_tick="1", heartbeat=time.time())       # this pid, but a process started at another tick
  with WriterLock(tmp_path):
    pass
