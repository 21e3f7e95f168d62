"""The persistent compilation cache: a restart, a second `edit` or a demo restart loads the programs
an earlier process compiled instead of compiling them again.

JAX keys each entry by the program's HLO (shapes, dtypes and the model's structure; weights are
arguments, never constants), the compile options, the devices and the jax/XLA versions, so another
run, shape or machine cannot load a wrong program: it misses and compiles.
"""

from __future__ import annotations

import logging
import os

import jax
from etils import epath

log = logging.getLogger(__name__)


def cache_dir(setting: str, workdir) -> str | None:
  """The folder `setting` names: "auto" is <workdir>/compile_cache for a training run and the
  user's cache folder for readers (workdir None); "" is off; anything else is a path."""
  if not setting:
    return None
  if setting != "auto":
    return setting
  if workdir is not None:
    return str(epath.Path(workdir) / "compile_cache")
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "mgie_jax", "compile_cache")


def use_compile_cache(c, workdir=None) -> str | None:
  """Point JAX at the cache `c.compile_cache` names and return the folder (None: off). A training
  run (`workdir`) caches under it; readers of a run or of released weights (edit, demo: no
  workdir) never write into the run and use the user's cache, where entries from every run
  share one folder safely (the key is the program, not the weights), caching small programs
  too (building a model eagerly compiles hundreds of them). A cache named in
  JAX_COMPILATION_CACHE_DIR, e.g. a cluster-wide one, wins."""
  setting = c.get("compile_cache", "auto")
  if jax.process_count() > 1 and jax.devices()[0].platform == "cpu":
    # A CPU executable carries its own process's collectives setup: a host that loads another
    # host's entry from a shared cache runs mismatched collectives (seen as gloo size errors).
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  folder = cache_dir(setting, workdir)
  if folder is None:
    return None
  if workdir is None:
    try:
      epath.Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:                    # e.g. a read-only home in a container
      log.info("compile cache %s unusable (%s): compiling without it", folder, e)
      return None
  jax.config.update("jax_compilation_cache_dir", folder)
  min_seconds = 0.0 if workdir is None else float(c.get("compile_cache_min_seconds", 1.0))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
  return folder
