"""TFDS builders for the evaluation benchmarks: MagicBrush, EVR, GIER, MA5k-Req (one feature
layout, see common.py)."""

from data_pipelines.eval_sets.magicbrush import MagicBrush
from data_pipelines.eval_sets.magicbrush import build as build_mb
from data_pipelines.eval_sets.pairs import Evr, Gier, Ma5k
from data_pipelines.eval_sets.pairs import build as build_pairs

EVAL_SETS = ("magicbrush", "evr", "gier", "ma5k")


def build(name: str, source_dir: str, data_dir: str, source: str = "parquet", overwrite: bool = False, **kw):
  """Build (or reuse) an evaluation set; returns the builder."""
  if name == "magicbrush":
    return build_mb(source_dir, data_dir, source, overwrite, **kw)
  return build_pairs(name, source_dir, data_dir, overwrite, **kw)
