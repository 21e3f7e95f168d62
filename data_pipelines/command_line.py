"""What the data_pipelines commands share: argparse errors and user mistakes as one line on
stderr with exit code 2 (`--verbose` re-raises for the traceback)."""

import argparse
import sys

from mgie_jax.core import errors


class Parser(argparse.ArgumentParser):
  def error(self, message):   # one line, exit code 2 (argparse's own convention)
    print(f"error: {message}; see --help", file=sys.stderr)
    sys.exit(2)


def run_command(a, check, run) -> None:
  """check(a) then run(a); a UserError from either is one line and exit code 2."""
  try:
    check(a)
    run(a)
  except errors.UserError as e:
    if a.verbose:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
