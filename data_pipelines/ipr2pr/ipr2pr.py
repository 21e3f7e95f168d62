"""IPr2Pr as a TFDS ArrayRecord dataset, written without TensorFlow.

Sources (builder configs):
  folder   the release layout: seeds.json = sorted [[folder, [seed, ...]], ...];
           <folder>/prompt.json {"input", "edit", "output"} (some copies hold only "edit");
           <folder>/<seed>_0.jpg (input) and <seed>_1.jpg (edited). One example per seed pair;
           InstructPix2Pix's contiguous split by sorted folder: 90% train, 5% val, 5% test.
  parquet  the hub copy: *.parquet with original_prompt, original_image, edit_prompt,
           edited_prompt, edited_image (images as JPEG bytes); a train split only.

Images are stored as their original encoded bytes (no re-encoding). MGIE's expressive
instructions, if given, are joined by key "<folder>_<seed>_0" (parquet: "<file stem>_<row>").
Bad records are skipped and counted by reason; the counts are printed and saved in the
dataset's metadata (`builder.info.metadata["skipped"]`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.images import MAX_PIXELS, BadImage, check_image

log = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "validation", "test")


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


def _load_expressive(path: str | None) -> dict:
  if not path:
    return {}
  with open(path, encoding="utf-8") as f:
    table = json.load(f)
  if not isinstance(table, dict):
    raise ValueError(f"{path}: expected a JSON object keyed '<folder>_<seed>_0'")
  return table


class Ipr2pr(tfds.core.GeneratorBasedBuilder):
  """InstructPix2Pix edit pairs with optional MGIE expressive instructions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      Ipr2prConfig(name="folder", source="folder", description="clip-filtered-dataset folder release"),
      Ipr2prConfig(name="parquet", source="parquet", description="parquet copy (train only)"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """The source is read from --manual_dir: the folder release
  (seeds.json and prompt folders) or a folder of IPr2Pr .parquet files."""

  def __init__(self, *, expressive_json: str | None = None,
               split_fractions: tuple = (0.9, 0.05, 0.05), max_pixels: int = MAX_PIXELS, **kwargs):
    self.expressive_json = expressive_json
    self.split_fractions = tuple(split_fractions)
    self.max_pixels = max_pixels
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

  def _split_generators(self, dl_manager):
    self.source_dir = str(dl_manager.manual_dir)
    if not os.path.isdir(self.source_dir):
      raise ValueError(f"manual_dir {self.source_dir!r} is not a directory")
    expressive = _load_expressive(self.expressive_json)
    if self.builder_config.source == "parquet":
      return {"train": self._generate_examples(("parquet", None), expressive)}
    path = os.path.join(self.source_dir, "seeds.json")
    if not os.path.exists(path):
      raise ValueError(f"{path} is missing: not an IPr2Pr folder release")
    with open(path) as f:
      seeds = json.load(f)
    bounds = np.cumsum((0.0,) + self.split_fractions)
    out = {}
    for name, lo, hi in zip(SPLIT_NAMES, bounds[:-1], bounds[1:]):
      # InstructPix2Pix's own arithmetic: floor of fraction x number of folders.
      part = seeds[math.floor(lo * len(seeds)):math.floor(hi * len(seeds))]
      out[name] = self._generate_examples((name, part), expressive)
    return out

  # --- generation -----------------------------------------------------------------------------
  def _generate_examples(self, split_and_items, expressive):
    split, items = split_and_items
    skipped = collections.Counter()
    kept = 0
    rows = self._parquet_rows(skipped) if split == "parquet" else self._folder_rows(items, skipped)
    for key, pair, texts in rows:
      try:
        for data in pair:
          check_image(data, self.max_pixels)
      except BadImage as e:
        skipped[e.reason] += 1
        continue
      extra = expressive.get(key)
      if extra is not None and not (isinstance(extra, dict) and isinstance(extra.get("expressive"), str)):
        skipped["malformed_expressive"] += 1
        continue
      kept += 1
      yield key, {"key": key, "input_image": pair[0], "edited_image": pair[1],
                  "instruction": texts["edit"],
                  "expressive": extra["expressive"] if extra else texts["edit"],
                  "input_caption": texts.get("input") or "", "output_caption": texts.get("output") or ""}
    self._report("train" if split == "parquet" else split, kept, skipped)

  def _report(self, split, kept, skipped):
    meta = self.info.metadata
    meta.setdefault("kept", {})[split] = kept
    meta.setdefault("skipped", {})[split] = dict(sorted(skipped.items()))
    summary = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
    print(f"[ipr2pr/{self.builder_config.name}] {split}: kept {kept}, skipped {sum(skipped.values())} ({summary})")

  def _folder_rows(self, items, skipped):
    root = self.source_dir
    for folder, seeds in items:
      seeds = list(seeds)
      texts, reason = self._prompt(os.path.join(root, folder, "prompt.json"))
      if reason:
        skipped[reason] += len(seeds)
        continue
      for seed in seeds:
        pair = [_read_bytes(os.path.join(root, folder, f"{seed}_{i}.jpg")) for i in (0, 1)]
        if any(p is None for p in pair):
          skipped["missing_image"] += 1
          continue
        yield f"{folder}_{seed}_0", pair, texts

  @staticmethod
  def _prompt(path):
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

  def _parquet_rows(self, skipped):
    import pyarrow.parquet as pq
    files = sorted(f for f in os.listdir(self.source_dir) if f.endswith(".parquet"))
    if not files:
      raise ValueError(f"no .parquet files in {self.source_dir}")
    for name in files:
      table = pq.ParquetFile(os.path.join(self.source_dir, name))
      stem, row = os.path.splitext(name)[0], 0
      for batch in table.iter_batches(batch_size=64):
        for rec in batch.to_pylist():
          key, row = f"{stem}_{row}", row + 1
          pair = [_image_bytes(rec.get("original_image")), _image_bytes(rec.get("edited_image"))]
          if any(p is None for p in pair):
            skipped["missing_image"] += 1
            continue
          edit = rec.get("edit_prompt")
          if not isinstance(edit, str) or not edit.strip():
            skipped["empty_prompt"] += 1
            continue
          yield key, pair, {"edit": edit, "input": rec.get("original_prompt"),
                            "output": rec.get("edited_prompt")}


def _image_bytes(value):
  """Parquet image cells are raw bytes or HF's {"bytes": ..., "path": ...} struct."""
  if isinstance(value, dict):
    value = value.get("bytes")
  return value if isinstance(value, (bytes, bytearray)) and value else None


def build(source_dir: str, data_dir: str, source: str = "folder", expressive_json: str | None = None,
          **kwargs) -> Ipr2pr:
  """Build (or reuse) the dataset under data_dir/ipr2pr/<source>/1.0.0; returns the builder."""
  builder = Ipr2pr(config=source, data_dir=data_dir, file_format="array_record",
                   expressive_json=expressive_json, **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(source_dir)))
  return builder
