"""One writer per run: a lock in the workdir that `train` holds while it writes there.

Claims, not a single lock file, so that it works on object stores (gs://, s3://) as on local disks:
a store offers atomic whole-object writes and listings that show every finished write, but no
exclusive create or file locks. A writer

1. writes its own claim `<workdir>/writer.lock/<time>-<host>-<pid>-<nonce>.json` (host, pid,
   start time, the machine's boot id and the process's start tick, a heartbeat);
2. lists the claims and keeps only the live ones (below);
3. runs only if its own is the only live claim. Otherwise it removes its claim and stops with one
   line naming the holder. Two writers that start at the same moment may both see each other and
   both stop; neither ever runs beside another.

The holder refreshes its heartbeat every `HEARTBEAT_S` seconds from a thread and removes its claim
when it exits. A claim left by a process that was killed (SIGKILL, a lost machine) is stale:
at once, when it names this machine (same boot id) and its process is gone or is another process
with a reused pid; otherwise when its heartbeat is older than `LEASE_S`. Stale claims are removed.
Readers (edit, evaluate, export, demo) never take the lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from mgie_jax.core import errors, paths

FOLDER = "writer.lock"
HEARTBEAT_S = 30.0
LEASE_S = 300.0      # a claim from another machine whose heartbeat is older than this is stale


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _start_tick(pid: int) -> str:
  """The process's start time in clock ticks since boot (tells a reused pid apart); '' if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def _alive_here(pid: int, tick: str) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  now = _start_tick(pid)
  return not (tick and now and now != tick)


def is_live(claim: dict, now: float | None = None) -> bool:
  """Whether the writer a claim names may still be running."""
  now = time.time() if now is None else now
  if claim.get("boot_id") and claim["boot_id"] == _boot_id():
    return _alive_here(int(claim["pid"]), claim.get("start_tick", ""))
  return now - float(claim.get("heartbeat", 0)) < LEASE_S


def describe(claim: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(claim.get("started", 0))))
  return f"host {claim.get('host', '?')}, pid {claim.get('pid', '?')}, started {started}"


class WriterLock:
  """`acquire()` or raise errors.RUN_LOCKED; `release()` (also on exit paths) removes the claim."""

  def __init__(self, workdir):
    self.folder = paths.path(workdir) / FOLDER
    self.claim = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "boot_id": _boot_id(), "start_tick": _start_tick(os.getpid())}
    name = f"{int(self.claim['started'] * 1e6)}-{self.claim['host']}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    self.file = self.folder / f"{name}.json"
    self._stop = threading.Event()
    self._thread = None
    self.held = False

  def _write(self):
    self.claim["heartbeat"] = time.time()
    tmp = self.folder / f".{self.file.name}.tmp"
    tmp.write_text(json.dumps(self.claim))
    tmp.rename(self.file)         # a reader never sees a half-written claim

  def _others(self) -> list[dict]:
    live = []
    for f in self.folder.glob("*.json"):
      if f.name == self.file.name:
        continue
      try:
        claim = json.loads(f.read_text())
      except (OSError, ValueError):
        continue       # vanished (its writer released it) or being replaced
      if is_live(claim):
        live.append(claim)
      else:
        try:
          f.unlink()
        except OSError:
          pass
    return sorted(live, key=lambda c: c.get("started", 0))

  def acquire(self) -> "WriterLock":
    self.folder.mkdir(parents=True, exist_ok=True)
    self._write()
    others = self._others()
    if others:
      self._remove()
      raise errors.RUN_LOCKED(workdir=str(self.folder.parent), holder=describe(others[0]))
    self.held = True
    self._thread = threading.Thread(target=self._beat, name="writer-lock-heartbeat", daemon=True)
    self._thread.start()
    return self

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self._write()
      except OSError:
        pass       # a store hiccup: the next beat tries again, well inside the lease

  def _remove(self):
    try:
      self.file.unlink()
    except OSError:
      pass

  def release(self):
    if self.held:
      self._stop.set()
      if self._thread is not None:
        self._thread.join(timeout=10)     # no heartbeat may re-create the claim after this
      self.held = False
      self._remove()

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
