"""What the absl commands share: flag errors and user errors as one line on stderr with exit
code 2, tracebacks only with --verbose (or for real bugs), logging that does not tear the
progress bar."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mgie_jax.core import errors

flags.DEFINE_bool("verbose", False, "show tracebacks for user errors")


def fail(e: errors.UserError):
  print(f"error: {e}", file=sys.stderr, flush=True)
  sys.exit(2)


def flat_keys(cfg, prefix="") -> list[str]:
  """Dotted names of every leaf of an ml_collections ConfigDict (or dict)."""
  out = []
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    if hasattr(v, "items"):
      out += flat_keys(v, name + ".")
    else:
      out.append(name)
  return out


def _flag_error(argv, exc) -> errors.UserError:
  text = " ".join(str(exc).split())
  m = re.search(r"flag (--?[\w.]+)(?:=\S*)?: (.*)", text)
  flag, detail = (m.group(1), m.group(2)) if m else (None, text)
  if flag and "." in flag:   # an ml_collections override: --config.a.b=...
    root, key = flag.lstrip("-").split(".", 1)
    cfg = flags.FLAGS[root].value if root in flags.FLAGS else None
    if cfg is not None and key not in flat_keys(cfg):
      return errors.CONFIG_KEY(flag=flag, key=key, nearest=errors.nearest(key, flat_keys(cfg)))
  m = re.search(r"flag (--\w+) must have a value other than None", text, re.I)
  if m:
    return errors.FLAG_MISSING(detail=f"{m.group(1)} is required")
  if flag:
    return errors.FLAG_VALUE(flag=flag, detail=detail)
  return errors.FLAG_MISSING(detail=text)


def _config_override_key(argv) -> errors.UserError | None:
  """Unknown `--config.*` keys, checked before ml_collections sees them (it raises a bare
  AttributeError for those)."""
  for arg in argv[1:]:
    m = re.match(r"--(\w+)\.([\w.]+)(=.*)?$", arg)
    if not m or m.group(1) not in flags.FLAGS:
      continue
    cfg = _config_value(argv, m.group(1))
    if cfg is None:
      continue
    key, known = m.group(2), flat_keys(cfg)
    # A whole sub-dict may be overridden too (e.g. --config.mesh.fsdp where mesh is a leaf dict).
    if key not in known and not any(k.startswith(key + ".") for k in known):
      return errors.CONFIG_KEY(flag=f"--{m.group(1)}.{key}", key=key, nearest=errors.nearest(key, known))
  return None


HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull", "--helpxml")


def _parse(argv):
  verbose = "--verbose" in argv or "--verbose=true" in argv
  try:
    out = flags.FLAGS(argv)
    for name in flags.FLAGS:      # config files load lazily: surface their errors now
      if name.split(".")[0] == name and type(flags.FLAGS[name]).__name__ == "_ConfigFlag":
        if flags.FLAGS[name].value is not None:     # an optional config may be left out
          flags.FLAGS[name].value.keys()
    return out
  except SystemExit as e:
    # absl prints the help and exits 1; asking for help is not a failure.
    if e.code == 1 and any(a in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    err = _config_override_key(argv) or _flag_error(argv, e)
  except (AttributeError, KeyError) as e:
    err = _config_override_key(argv) or errors.FLAG_VALUE(flag="--config", detail=str(e).strip("'\""))
  except Exception as e:  # a config file that fails to import
    if verbose:
      raise
    path = _config_path(argv)
    detail = ("no such file" if not os.path.isfile(path.partition(":")[0])
              else f"{type(e).__name__}: {e}".splitlines()[0])
    err = errors.CONFIG_FILE(path=path, detail=detail)
  if verbose:
    raise err
  fail(err)


def _config_path(argv, name: str = "config") -> str:
  for a in argv:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return "?"


def _config_value(argv, name: str):
  """The config a `--name=path[:arg]` flag names (loaded here: after a failed parse absl may
  not have set it)."""
  try:
    value = flags.FLAGS[name].value
  except Exception:
    value = None
  if value is not None:
    return value
  path = _config_path(argv, name)
  if path == "?":
    return None
  file, _, arg = path.partition(":")
  try:
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:
    return None


def run(main):
  """absl's app.run with one-line errors."""

  def wrapped(argv):
    try:
      return main(argv)
    except errors.UserError as e:
      if flags.FLAGS.verbose:
        raise
      fail(e)
    except KeyboardInterrupt:
      if flags.FLAGS.verbose:
        raise
      # Ctrl-C before a command has work to save (train saves at a step boundary once it runs).
      print("interrupted", file=sys.stderr, flush=True)
      sys.exit(130)

  app.run(wrapped, flags_parser=_parse)


def quiet_libraries(level=None):
  """Orbax, grain and JAX log every file and backend they touch; commands show their own lines."""
  absl_logging.set_verbosity(absl_logging.ERROR if level is None else level)
  for name in ("absl", "jax", "orbax"):
    logging.getLogger(name).setLevel(logging.ERROR if level is None else level)


def interactive(lead: bool = True) -> bool:
  """Whether this process draws progress bars: the lead process, on a terminal. Redirected to a
  file, a bar would write a carriage-return line per update; the log lines say the same there."""
  return lead and sys.stderr.isatty()


def progress(total: int, desc: str, lead: bool = True, initial: int = 0):
  return tqdm(total=total, initial=initial, disable=not interactive(lead), desc=desc, dynamic_ncols=True)


def log_through(bar_enabled: bool):
  """A context in which logging goes through tqdm (log lines do not tear the progress bar)."""
  if not bar_enabled:
    return contextlib.nullcontext()
  return logging_redirect_tqdm()
