"""What the evaluation datasets share: one feature layout, so that the evaluator reads MagicBrush,
EVR, GIER and MA5k-Req alike, and the helpers their source readers use.

  key           unique example id
  session       the edit session (MagicBrush) or the image pair the request belongs to
  turn          the turn's place in its session (1, 2, ... for MagicBrush; 0 elsewhere)
  input_image   encoded bytes, original file
  target_image  encoded bytes, the ground-truth edit
  mask_image    encoded bytes or b"" (MagicBrush's edit mask)
  instruction   the edit request
  caption       MagicBrush's local caption of the target (CLIP-T), else ""
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.checked import CheckedBuilder, listing_digest

SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "dev"}


class EvalSet(CheckedBuilder):
  """Base of the evaluation-set builders: the shared features and source description."""

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self.source_dir = os.path.abspath(source_dir) if source_dir else None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    blob = tfds.features.Tensor(shape=(), dtype=np.object_)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "key": text, "session": text, "turn": np.int32, "input_image": blob, "target_image": blob,
            "mask_image": blob, "instruction": text, "caption": text}),
        metadata=tfds.core.MetadataDict())

  def source_description(self) -> dict:
    root = self.source_dir
    names = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
             if f.endswith((".json", ".parquet"))]
    return {"dir": root, "digest": listing_digest(root, names), "max_pixels": self.max_pixels}


def example(key, session, turn, input_image, target_image, instruction, mask_image=b"", caption=""):
  return {"key": str(key), "session": str(session), "turn": int(turn), "input_image": input_image,
          "target_image": target_image, "mask_image": mask_image or b"", "instruction": instruction,
          "caption": caption or ""}


def read_bytes(path: str):
  """The file's bytes, or None when it is missing."""
  if not path or not os.path.isfile(path):
    return None
  with open(path, "rb") as f:
    return f.read()


def find_image(root: str, name: str, folders=("images", "")) -> str | None:
  """`name` under one of `folders` of `root`, trying common extensions when it has none."""
  if not isinstance(name, str) or not name:
    return None
  exts = ("",) if os.path.splitext(name)[1] else ("", ".jpg", ".png", ".jpeg", ".tif")
  for folder in folders:
    for ext in exts:
      path = os.path.join(root, folder, name + ext)
      if os.path.isfile(path):
        return path
  return None


def load_json(path: str):
  """JSON that may hold bare NaN (GIER's files do): NaN becomes None."""
  with open(path, encoding="utf-8") as f:
    return json.load(f, parse_constant=lambda c: None)


def texts(value) -> list[str]:
  """Non-empty strings of a field that may be a string, a list, None or NaN."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return []
  if isinstance(value, str):
    return [value.strip()] if value.strip() else []
  if isinstance(value, (list, tuple)):
    return [t for v in value for t in texts(v)]
  return []
