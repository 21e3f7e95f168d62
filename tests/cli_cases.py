"""Run many command lines of the mgie_jax commands in one process: heavy imports once, then one
forked child per case. Reads a JSON list of cases on stdin, prints a JSON list of results.

A case: {"module": "mgie_jax.edit", "argv": [...], "env": {...}, "forbid": ["mgie_jax.run.model:build"]}.
`forbid` names functions that must not be called (model building, compiling): the child replaces
them by a function that exits with code 99, so a test can assert an error came before them.
A result: {"rc", "stdout", "stderr", "seconds"}.
"""

import importlib
import json
import os
import runpy
import sys
import tempfile
import time

import flax  # noqa: F401  (jax, flax, numpy imported once, before forking)
import jax  # noqa: F401

FORBIDDEN_RC = 99


def _forbid(spec: str):
  module, name = spec.split(":")
  mod = importlib.import_module(module)

  def boom(*a, **k):
    print(f"FORBIDDEN CALL {spec}", file=sys.stderr, flush=True)
    os._exit(FORBIDDEN_RC)
  setattr(mod, name, boom)


def run_case(case: dict) -> dict:
  out_f, err_f = tempfile.TemporaryFile(), tempfile.TemporaryFile()
  t0 = time.time()
  pid = os.fork()
  if pid == 0:   # the child: one command line
    os.dup2(out_f.fileno(), 1)
    os.dup2(err_f.fileno(), 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.environ.update(case.get("env", {}))
    os.chdir(case.get("cwd", os.getcwd()))
    code = 0
    try:
      for spec in case.get("forbid", []):
        _forbid(spec)
      sys.argv = [case["module"]] + list(case["argv"])
      runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
      import traceback
      traceback.print_exc()
      code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  _, status = os.waitpid(pid, 0)
  seconds = time.time() - t0
  rc = os.waitstatus_to_exitcode(status)
  out_f.seek(0)
  err_f.seek(0)
  return {"rc": rc, "stdout": out_f.read().decode(errors="replace"),
          "stderr": err_f.read().decode(errors="replace"), "seconds": seconds}


def main():
  # Two children at a time: most cases exit within a second of argument checks, and two cores are the
  # development machine's floor. Each child has its own files and working directory, so they do not meet.
  from concurrent.futures import ThreadPoolExecutor
  cases = json.load(sys.stdin)
  with ThreadPoolExecutor(int(os.environ.get("CLI_CASES_PARALLEL", "2"))) as pool:
    print(json.dumps(list(pool.map(run_case, cases))))


if __name__ == "__main__":
  main()
