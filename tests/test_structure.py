"""Dependencies point one way: models import neither converters nor training nor data pipelines;
the library imports data_pipelines nowhere (only the train and evaluate commands read datasets)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"mgie_jax/train.py", "mgie_jax/evaluate.py"}


def imports(path):
  """Every module a file imports, top level or inside functions."""
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module


def top_level_imports(path):
  for node in ast.parse(open(path).read()).body:
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module


def files(folder):
  for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
    for n in names:
      if n.endswith(".py"):
        full = os.path.join(dirpath, n)
        yield os.path.relpath(full, ROOT), full


def test_models_do_not_import_converters_training_or_data():
  for rel, path in files("mgie_jax/models"):
    for mod in top_level_imports(path):
      assert not mod.startswith(("mgie_jax.convert", "mgie_jax.training", "data_pipelines")), (rel, mod)


def test_the_library_does_not_import_data_pipelines():
  for rel, path in files("mgie_jax"):
    if rel in COMMANDS:
      continue
    for mod in imports(path):
      assert not mod.startswith("data_pipelines"), (rel, mod)


def test_inference_does_not_go_through_the_training_setup():
  for rel in ("mgie_jax/inference.py", "mgie_jax/trained.py", "mgie_jax/edit.py"):
    for mod in imports(os.path.join(ROOT, rel)):
      assert mod not in ("mgie_jax.training.setup", "mgie_jax.training.optim", "mgie_jax.training.step"), (rel, mod)
