"""The frozen-feature cache's format: what `python -m data_pipelines.features` writes and the loader
reads in place of the images (mgie_jax.models.mgie.FEATURES).

  <cache>/meta.json                          fingerprint of the frozen VAE + CLIP tower, the models'
                                             description, the fields, each split's record count
  <cache>/<split>.array_record-SSSSS-of-NNNNN  one ArrayRecord record per dataset record, in the
                                             split's order (record i of the split = cache record i)

A record is  b"\\x01" + u16 key length + key + each field's bytes (meta's order and dtype)  for a
cached example, or  b"\\x00" + u16 key length + key + reason  for a record whose images could not be
decoded (the loader skips it and counts the reason). A shard file appears only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import ml_dtypes
import numpy as np

from mgie_jax.core import errors
from mgie_jax.core.fingerprint import tree_fingerprint

FORMAT = 1
META = "meta.json"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}.array_record-{index:05d}-of-{count:05d}"


def shard_count(examples: int, shard_size: int) -> int:
  return max(1, -(-examples // shard_size))


@dataclasses.dataclass(frozen=True)
class Meta:
  fingerprint: str                 # mgie_jax.core.fingerprint of the frozen towers + `models`
  models: dict                     # what made it (sources, dtypes, resolution): checked before loading
  fields: tuple                    # ((name, shape), ...)
  dtype: str                       # storage dtype of every field
  shard_size: int
  splits: dict                     # split -> number of records

  def to_json(self) -> str:
    return json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "models": self.models,
                       "fields": [[n, list(s)] for n, s in self.fields], "dtype": self.dtype,
                       "shard_size": self.shard_size, "splits": self.splits}, indent=1, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "Meta":
    d = json.loads(text)
    if d.get("format") != FORMAT:
      raise ValueError(f"cache format {d.get('format')!r}, this version reads {FORMAT}")
    return cls(d["fingerprint"], d["models"], tuple((n, tuple(s)) for n, s in d["fields"]), d["dtype"],
               int(d["shard_size"]), {k: int(v) for k, v in d["splits"].items()})

  def shard_paths(self, cache_dir: str, split: str) -> list:
    n = shard_count(self.splits[split], self.shard_size)
    return [os.path.join(cache_dir, shard_name(split, i, n)) for i in range(n)]

  def missing_shards(self, cache_dir: str, split: str) -> list:
    return [p for p in self.shard_paths(cache_dir, split) if not os.path.exists(p)]


def towers_fingerprint(towers: dict, model_config, resolution: int) -> str:
  """The fingerprint of the frozen VAE + CLIP tower (`towers`, nested as the frozen parameters)
  with the settings that shape their outputs."""
  llava = model_config.llava
  return tree_fingerprint(towers, {"resolution": int(resolution), "clip_size": int(model_config.clip_size),
                                   "vision_feature_layer": llava.vision_feature_layer,
                                   "select": llava.vision_feature_select_strategy,
                                   "vision_dtype": llava.vision.dtype, "vae_dtype": model_config.vae.dtype})


def read_meta(cache_dir: str) -> Meta:
  with open(os.path.join(cache_dir, META)) as f:
    return Meta.from_json(f.read())


def pack(key: bytes, arrays: dict | None, meta: Meta, reason: str = "") -> bytes:
  """One record: the example's fields in meta's order and dtype, or (arrays None) a skip with its reason."""
  head = struct.pack("<H", len(key)) + key
  if arrays is None:
    return b"\x00" + head + reason.encode()
  dt = DTYPES[meta.dtype]
  parts = []
  for name, shape in meta.fields:
    a = np.asarray(arrays[name])
    if a.shape != tuple(shape):
      raise ValueError(f"{name}: shape {a.shape}, the cache holds {tuple(shape)}")
    parts.append(np.ascontiguousarray(a.astype(dt)).tobytes())
  return b"\x01" + head + b"".join(parts)


def unpack(record: bytes, meta: Meta) -> tuple[bytes, dict | None, str]:
  """(key, {name: float32 array} or None, skip reason)."""
  (n,) = struct.unpack_from("<H", record, 1)
  key, body = record[3:3 + n], record[3 + n:]
  if record[:1] == b"\x00":
    return key, None, body.decode()
  dt = np.dtype(DTYPES[meta.dtype])
  out, at = {}, 0
  for name, shape in meta.fields:
    size = int(np.prod(shape)) * dt.itemsize
    out[name] = np.frombuffer(body, dt, count=int(np.prod(shape)), offset=at).reshape(shape).astype(np.float32)
    at += size
  if at != len(body):
    raise ValueError(f"a cache record of {len(body)} bytes, the fields take {at}")
  return key, out, ""


def check_cache(path: str, sources: dict, split: str = "train") -> Meta:
  """config.data.features: a complete cache of `split` made by the towers `sources` describes
  (mgie_jax.run.model.tower_sources; the trainer compares the weights' fingerprint once loaded)."""
  if not os.path.isfile(os.path.join(path, META)):
    raise errors.FEATURES_MISSING(path=path)
  meta = read_meta(path)
  if split not in meta.splits:
    raise errors.FEATURES_STALE(path=path, what=f"for the splits {list(meta.splits)}, without {split!r}")
  missing = meta.missing_shards(path, split)
  if missing:
    raise errors.FEATURES_INCOMPLETE(path=path, missing=len(missing), split=split,
                                     total=len(meta.shard_paths(path, split)))
  if meta.models != sources:
    raise errors.FEATURES_STALE(path=path, what=f"by {meta.models}, not by this config's {sources}")
  return meta


class JoinedSource:
  """A dataset split's records with their cache records beside them (`record["features"]`), for grain."""

  def __init__(self, records, cache_dir: str, split: str):
    import grain
    self.meta = read_meta(cache_dir)
    self.records = records
    self.features = grain.sources.ArrayRecordDataSource(self.meta.shard_paths(cache_dir, split))
    if len(self.features) != len(records):
      raise ValueError(f"the cache in {cache_dir} holds {len(self.features)} {split} records, "
                       f"the dataset {len(records)}")

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    record = dict(self.records[i])
    record["features"] = self.features[i]
    return record
