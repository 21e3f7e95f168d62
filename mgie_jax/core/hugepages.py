"""Transparent huge pages for the commands' large host buffers (Linux, glibc >= 2.35).

XLA:CPU allocates each program's temporaries and outputs with malloc on every call; buffers of
hundreds of MB (an embedding's gradient, its Adam moments' updates) are fresh mmaps each time, so
every step first-touches them 4 KiB at a time: on a 2-core box the kernel's page-fault work was
larger than the step itself (docs/benchmarks.md, "One training step against the official code").
glibc's `glibc.malloc.hugetlb=1` tunable madvises its mappings for 2 MiB pages, 512x fewer
faults. glibc reads tunables only at process start, so a command re-executes itself once with the
tunable added (same pid, same arguments) before anything heavy is imported.

Left alone: other systems, an older glibc, THP other than `madvise` (`always` gives every process
huge pages already, `never` none), a GLIBC_TUNABLES that already names `glibc.malloc.hugetlb`,
and MGIE_JAX_HUGEPAGES=0 (the opt-out).
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "MGIE_JAX_HUGEPAGES"
COMMANDS = ("mgie_jax.train", "mgie_jax.edit", "mgie_jax.evaluate", "mgie_jax.demo", "mgie_jax.export",
            "mgie_jax.compile")


def _glibc_at_least(major: int, minor: int) -> bool:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    got = tuple(int(x) for x in version.split(".")[:2])
  except (ValueError, OSError, AttributeError):
    return False
  return name == "glibc" and got >= (major, minor)


def _thp_mode(path: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> str:
  """The kernel's THP mode: the bracketed word of `always [madvise] never`; '' when unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ""
  return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def environment(orig_argv: list[str], environ, thp: str | None = None, glibc: bool | None = None,
                any_program: bool = False) -> dict | None:
  """The environment to re-execute a command (or, with any_program, this program) with, or None
  to run as it is."""
  m = orig_argv.index("-m") if "-m" in orig_argv else -1
  command = m >= 1 and orig_argv[m + 1:m + 2] != [] and orig_argv[m + 1] in COMMANDS
  if not (command or any_program):
    return None            # only `python [options] -m mgie_jax.<command>`: never a library user's process
  if environ.get(OPT_OUT, "1") == "0" or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return None
  if not sys.platform.startswith("linux"):
    return None
  if (thp if thp is not None else _thp_mode()) != "madvise":
    return None            # `always`: the kernel already backs large mappings with huge pages
  if not (glibc if glibc is not None else _glibc_at_least(2, 35)):
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
  return env


def reexec_with_huge_pages(orig_argv: list[str] | None = None, environ=None, execve=os.execve,
                           any_program: bool = False) -> None:
  """Re-execute this command (a benchmark: any_program) with huge pages on where `environment`
  says so; returns otherwise."""
  orig_argv = list(sys.orig_argv if orig_argv is None else orig_argv)
  env = environment(orig_argv, os.environ if environ is None else environ, any_program=any_program)
  if env is None:
    return
  try:
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, [sys.executable] + orig_argv[1:], env)
  except OSError:
    return                 # no executable to re-run: go on with 4 KiB pages
