"""IPr2Pr as a TFDS ArrayRecord dataset, written without TensorFlow.

Sources (builder configs):
  folder   the release layout: seeds.json = sorted [[folder, [seed, ...]], ...];
           <folder>/prompt.json {"input", "edit", "output"} (some copies hold only "edit");
           <folder>/<seed>_0.jpg (input) and <seed>_1.jpg (edited). One example per seed pair;
           InstructPix2Pix's contiguous split by sorted folder: 90% train, 5% val, 5% test.
  parquet  the hub copy: *.parquet with original_prompt, original_image, edit_prompt,
           edited_prompt, edited_image (images as JPEG bytes); a train split only.

Images are stored as their original encoded bytes (no re-encoding). MGIE's expressive
instructions are joined by key "<folder>_<seed>_0" (parquet: "<file stem>_<row>"); an example
without one is skipped or gets the terse instruction as its target, as `missing_expressive`
says, and is counted either way. Bad records are skipped and counted by reason (see
data_pipelines.checked); the counts are printed and saved in the dataset's metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import tensorflow_datasets as tfds

from data_pipelines.checked import Candidate, CheckedBuilder, Skip, file_digest, listing_digest, prepare
from mgie_jax.core.images import MAX_PIXELS, BadImage

SPLIT_NAMES = ("train", "validation", "test")
MISSING_EXPRESSIVE = ("instruction", "skip")


@dataclasses.dataclass
class Ipr2prConfig(tfds.core.BuilderConfig):
  source: str = "folder"


def _read_text(path: str):
  """(text, None) or (None, reason)."""
  if not os.path.exists(path):
    return None, "missing_prompt"
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8"), None
  except UnicodeDecodeError:
    return None, "non_utf8_text"


def _read_bytes(path: str):
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    return f.read()


def load_expressive(path: str | None) -> dict:
  """MGIE's expressive-instruction JSON: {"<folder>_<seed>_0": {"instruction", "expressive"}}."""
  if not path:
    return {}
  with open(path, encoding="utf-8") as f:
    table = json.load(f)
  if not isinstance(table, dict):
    raise ValueError(f"{path}: expected a JSON object keyed '<folder>_<seed>_0'")
  return table


class Ipr2pr(CheckedBuilder):
  """InstructPix2Pix edit pairs with MGIE expressive instructions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      Ipr2prConfig(name="folder", source="folder", description="clip-filtered-dataset folder release"),
      Ipr2prConfig(name="parquet", source="parquet", description="parquet copy (train only)"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """The source is read from --manual_dir: the folder release
  (seeds.json and prompt folders) or a folder of IPr2Pr .parquet files."""

  def __init__(self, *, expressive_json: str | None = None, missing_expressive: str | None = None,
               split_fractions: tuple = (0.9, 0.05, 0.05), max_pixels: int = MAX_PIXELS,
               source_dir: str | None = None, **kwargs):
    if missing_expressive not in MISSING_EXPRESSIVE + (None,):
      raise ValueError(f"missing_expressive must be one of {MISSING_EXPRESSIVE}, got {missing_expressive!r}")
    if not expressive_json and missing_expressive is None:
      raise ValueError("no expressive-instruction file: pass missing_expressive='instruction' to train "
                       "on the terse instruction as the target, or an expressive_json")
    self.expressive_json = expressive_json
    self.missing_expressive = missing_expressive or "instruction"
    self.split_fractions = tuple(split_fractions)
    self.max_pixels = max_pixels
    self.source_dir = os.path.abspath(source_dir) if source_dir else None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "key": text,
            "input_image": tfds.features.Tensor(shape=(), dtype=np.object_),    # encoded bytes
            "edited_image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "instruction": text,        # the terse edit instruction
            "expressive": text,         # MGIE's expressive instruction, or the edit text
            "input_caption": text,
            "output_caption": text,
        }),
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/timothybrooks/instruct-pix2pix",
    )

  def source_description(self) -> dict:
    root = self.source_dir
    if self.builder_config.source == "folder":
      seeds = os.path.join(root, "seeds.json")
      digest = file_digest(seeds) if os.path.exists(seeds) else None
    else:
      digest = listing_digest(root, [f for f in os.listdir(root) if f.endswith(".parquet")])
    return {"dir": root, "digest": digest, "expressive": self.expressive_json and os.path.abspath(self.expressive_json),
            "expressive_digest": file_digest(self.expressive_json),
            "missing_expressive": self.missing_expressive,
            "split_fractions": list(self.split_fractions), "max_pixels": self.max_pixels}

  # --- the source -------------------------------------------------------------------------------
  def split_names(self):
    self._expressive = load_expressive(self.expressive_json)
    if self.builder_config.source == "parquet":
      return ["train"]
    with open(os.path.join(self.source_dir, "seeds.json")) as f:
      seeds = json.load(f)
    bounds = np.cumsum((0.0,) + self.split_fractions)
    self._parts = {}
    for name, lo, hi in zip(SPLIT_NAMES, bounds[:-1], bounds[1:]):
      # InstructPix2Pix's own arithmetic: floor of fraction x number of folders.
      self._parts[name] = seeds[math.floor(lo * len(seeds)):math.floor(hi * len(seeds))]
    return list(SPLIT_NAMES)

  def _candidates(self, split):
    rows = self._parquet_rows() if self.builder_config.source == "parquet" else self._folder_rows(split)
    for row in rows:
      if isinstance(row, Skip):
        yield row
        continue
      key, read, texts = row
      extra = self._expressive.get(key)
      notes, drop = (), None
      if extra is not None and not (isinstance(extra, dict) and isinstance(extra.get("expressive"), str)
                                    and extra["expressive"].strip()):
        yield Skip("malformed_expressive")
        continue
      if extra is None:
        if self.missing_expressive == "skip":
          drop = "no_expressive"
        notes = ("expressive_fallback",)
      expressive = extra["expressive"] if extra else texts["edit"]
      yield Candidate(key, functools.partial(_example, key, read, texts, expressive),
                      ("input_image", "edited_image"), notes, drop)

  def _folder_rows(self, split):
    root = self.source_dir
    for folder, seeds in self._parts[split]:
      seeds = list(seeds)
      texts, reason = read_prompt(os.path.join(root, folder, "prompt.json"))
      if reason:
        yield Skip(reason, len(seeds))
        continue
      for seed in seeds:
        paths = [os.path.join(root, folder, f"{seed}_{i}.jpg") for i in (0, 1)]
        if not all(os.path.exists(p) for p in paths):
          yield Skip("missing_image")
          continue
        yield f"{folder}_{seed}_0", functools.partial(_read_pair, paths), texts

  def _parquet_rows(self):
    files = sorted(f for f in os.listdir(self.source_dir) if f.endswith(".parquet"))
    if not files:
      raise ValueError(f"no .parquet files in {self.source_dir}")
    for name in files:
      path = os.path.join(self.source_dir, name)
      table = pq.ParquetFile(path)
      stem, row = os.path.splitext(name)[0], 0
      for group in range(table.num_row_groups):
        texts_of = table.read_row_group(group, columns=["edit_prompt", "original_prompt", "edited_prompt"]).to_pylist()
        for i, rec in enumerate(texts_of):
          key, row = f"{stem}_{row}", row + 1
          edit = rec.get("edit_prompt")
          if not isinstance(edit, str) or not edit.strip():
            yield Skip("empty_prompt")
            continue
          texts = {"edit": edit, "input": rec.get("original_prompt"), "output": rec.get("edited_prompt")}
          yield key, functools.partial(_parquet_pair, path, group, i), texts


@functools.lru_cache(maxsize=2)
def _row_group(path: str, group: int):
  return pq.ParquetFile(path).read_row_group(group, columns=["original_image", "edited_image"]).to_pylist()


def _parquet_pair(path, group, i):
  rec = _row_group(path, group)[i]
  return [_image_bytes(rec.get("original_image")), _image_bytes(rec.get("edited_image"))]


def _read_pair(paths):
  return [_read_bytes(p) for p in paths]


def _example(key, read, texts, expressive):
  pair = read()
  if any(p is None for p in pair):
    raise BadImage("missing_image")
  return {"key": key, "input_image": pair[0], "edited_image": pair[1], "instruction": texts["edit"],
          "expressive": expressive, "input_caption": texts.get("input") or "",
          "output_caption": texts.get("output") or ""}


def read_prompt(path):
  raw, reason = _read_text(path)
  if reason:
    return None, reason
  try:
    texts = json.loads(raw)
  except json.JSONDecodeError:
    return None, "malformed_prompt"
  if not isinstance(texts, dict):
    return None, "malformed_prompt"
  if not isinstance(texts.get("edit"), str) or not texts["edit"].strip():
    return None, "empty_prompt"
  if any(k in texts and not isinstance(texts[k], (str, type(None))) for k in ("input", "output")):
    return None, "malformed_prompt"
  return texts, None


def _image_bytes(value):
  """Parquet image cells are raw bytes or HF's {"bytes": ..., "path": ...} struct."""
  if isinstance(value, dict):
    value = value.get("bytes")
  return value if isinstance(value, (bytes, bytearray)) and value else None


def check_source(source_dir: str, source: str) -> None:
  """Raise ValueError unless `source_dir` looks like the named IPr2Pr release."""
  if not os.path.isdir(source_dir):
    raise FileNotFoundError(source_dir)
  if source == "folder" and not os.path.exists(os.path.join(source_dir, "seeds.json")):
    raise ValueError(f"{source_dir} has no seeds.json: not an IPr2Pr folder release")
  if source == "parquet" and not any(f.endswith(".parquet") for f in os.listdir(source_dir)):
    raise ValueError(f"{source_dir} has no .parquet files")


def build(source_dir: str, data_dir: str, source: str = "folder", expressive_json: str | None = None,
          missing_expressive: str | None = None, overwrite: bool = False, **kwargs) -> Ipr2pr:
  """Build (or reuse) the dataset under data_dir/ipr2pr/<source>/1.0.0; returns the builder."""
  check_source(source_dir, source)
  make = lambda: Ipr2pr(config=source, data_dir=data_dir, file_format="array_record",
                        expressive_json=expressive_json, missing_expressive=missing_expressive,
                        source_dir=source_dir, **kwargs)
  return prepare(make, source_dir, overwrite)
