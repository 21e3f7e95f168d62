"""MagicBrush (Zhang et al. 2023) as TFDS ArrayRecord, sessions and turn order kept.

Sources (builder configs):
  parquet  the Hugging Face release: *.parquet with img_id, turn_index, source_img, mask_img,
           instruction, target_img (images as bytes or {"bytes", "path"}); files named
           train-*.parquet and dev-*.parquet (any folder depth) give the train and dev splits.
  folder   the test release: edit_sessions.json {session: [{input, mask, output, instruction},
           ...]} in turn order, images/<session>/<file>, local_descriptions.json and
           global_descriptions.json {session: {file: caption}}; the split is `test`.
A turn's caption is the local description of its output image (CLIP-T's text). The
multi-turn setting feeds each turn the model's own previous output: the evaluator follows
`session` and `turn`.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os

import pyarrow.parquet as pq
import tensorflow_datasets as tfds

from data_pipelines.checked import Candidate, Skip, prepare
from data_pipelines.eval_sets.common import EvalSet, example, load_json, read_bytes
from mgie_jax.core.images import BadImage


@dataclasses.dataclass
class MagicBrushConfig(tfds.core.BuilderConfig):
  source: str = "parquet"


class MagicBrush(EvalSet):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [MagicBrushConfig(name="parquet", source="parquet", description="HF train/dev parquet"),
                     MagicBrushConfig(name="folder", source="folder", description="test release folder")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "The parquet files (train/dev) or the unzipped test folder."

  def split_names(self):
    if self.builder_config.source == "folder":
      self._root = test_root(self.source_dir)
      return ["test"]
    self._files = {s: sorted(glob.glob(os.path.join(self.source_dir, "**", f"{s}-*.parquet"), recursive=True))
                   for s in ("train", "dev")}
    return [s for s, files in self._files.items() if files]

  def _candidates(self, split):
    if self.builder_config.source == "folder":
      yield from self._folder()
      return
    for path in self._files[split]:
      pf = pq.ParquetFile(path)
      for group in range(pf.num_row_groups):
        meta = pf.read_row_group(group, columns=["img_id", "turn_index", "instruction"]).to_pylist()
        for i, rec in enumerate(meta):
          if not isinstance(rec.get("instruction"), str) or not rec["instruction"].strip():
            yield Skip("empty_instruction")
            continue
          if rec.get("img_id") is None or rec.get("turn_index") is None:
            yield Skip("malformed_record")
            continue
          key = f"{rec['img_id']}_{int(rec['turn_index'])}"
          yield Candidate(key, functools.partial(_parquet_example, path, group, i, rec),
                          ("input_image", "target_image"))

  def _folder(self):
    root = self._root
    sessions = load_json(os.path.join(root, "edit_sessions.json"))
    local = _optional_json(os.path.join(root, "local_descriptions.json"))
    for session, turns in sorted(sessions.items(), key=lambda kv: _natural(kv[0])):
      if not isinstance(turns, list):
        yield Skip("malformed_record")
        continue
      for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not all(isinstance(turn.get(k), str) for k in ("input", "output")):
          yield Skip("malformed_record")
          continue
        if not isinstance(turn.get("instruction"), str) or not turn["instruction"].strip():
          yield Skip("empty_instruction")
          continue
        folder = os.path.join(root, "images", str(session))
        paths = {k: os.path.join(folder, turn[k]) if isinstance(turn.get(k), str) else None
                 for k in ("input", "output", "mask")}
        if not (os.path.isfile(paths["input"]) and os.path.isfile(paths["output"])):
          yield Skip("missing_image")
          continue
        caption = (local.get(str(session)) or {}).get(turn["output"], "") if isinstance(local, dict) else ""
        yield Candidate(f"{session}_{n}", functools.partial(_folder_example, session, n, paths,
                                                             turn["instruction"], caption),
                        ("input_image", "target_image"))


def _natural(s):
  return (0, int(s)) if str(s).isdigit() else (1, str(s))


def test_root(root: str) -> str:
  for candidate in (root, os.path.join(root, "test")):
    if os.path.isfile(os.path.join(candidate, "edit_sessions.json")):
      return candidate
  raise ValueError(f"{root} holds no edit_sessions.json: not the MagicBrush test release")


def _optional_json(path):
  return load_json(path) if os.path.isfile(path) else {}


@functools.lru_cache(maxsize=2)
def _row_group(path, group):
  return pq.ParquetFile(path).read_row_group(group, columns=["source_img", "target_img", "mask_img"]).to_pylist()


def _blob(value):
  if isinstance(value, dict):
    value = value.get("bytes")
  return bytes(value) if isinstance(value, (bytes, bytearray)) and value else None


def _parquet_example(path, group, i, rec):
  row = _row_group(path, group)[i]
  src, dst = _blob(row.get("source_img")), _blob(row.get("target_img"))
  if src is None or dst is None:
    raise BadImage("missing_image")
  return example(f"{rec['img_id']}_{int(rec['turn_index'])}", rec["img_id"], rec["turn_index"], src, dst,
                 rec["instruction"].strip(), _blob(row.get("mask_img")) or b"")


def _folder_example(session, n, paths, instruction, caption):
  return example(f"{session}_{n}", session, n, read_bytes(paths["input"]), read_bytes(paths["output"]),
                 instruction.strip(), read_bytes(paths["mask"]) or b"", caption)


def build(source_dir: str, data_dir: str, source: str = "parquet", overwrite: bool = False, **kw) -> MagicBrush:
  if not os.path.isdir(source_dir):
    raise FileNotFoundError(source_dir)
  if source == "folder":
    test_root(source_dir)
  make = lambda: MagicBrush(config=source, data_dir=data_dir, file_format="array_record", source_dir=source_dir, **kw)
  return prepare(make, source_dir, overwrite)
