"""The request benchmarks of the MGIE paper: image pairs, each with one or more edit requests,
one example per request (key "<pair>_<k>").

  EVR       <root>/{train,valid,test}.json: lists of {img0, img1, sents, uid}; images under
            <root>/images/ (or <root>). One request per train pair, three per valid/test pair.
  GIER      <root>/{train,val,test}.json (or under annotations/): lists of records with input,
            output, request and the expert_summary / amateur_summary lists; the files contain
            bare NaN (read as missing). Requests: the `request_fields` of each record, in that
            order, NaN and empty strings dropped.
  MA5k-Req  <root>/FiveK.json {id: {input, output, request, ...}} and
            <root>/annotations/{train,val,test}_sess_1.json: the ids of each split (a list of ids,
            or of records holding "id"); images under <root>/images/.
Split names: train, validation, test.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import tensorflow_datasets as tfds

from data_pipelines.checked import Candidate, Skip, prepare
from data_pipelines.eval_sets.common import EvalSet, example, find_image, load_json, read_bytes, texts

SPLITS = {"train": ("train",), "validation": ("valid", "val", "validation", "dev"), "test": ("test",)}


class PairSet(EvalSet):
  """Subclasses list (pair id, input name, output name, requests) per split in `_pairs`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _pairs(self, split):
    raise NotImplementedError

  def split_names(self):
    return [s for s in SPLITS if self._split_file(s) is not None]

  def _split_file(self, split):
    raise NotImplementedError

  def _candidates(self, split):
    root = self.source_dir
    for pair in self._pairs(split):
      if isinstance(pair, Skip):
        yield pair
        continue
      pid, src, dst, requests = pair
      if not requests:
        yield Skip("no_request")
        continue
      paths = find_image(root, src), find_image(root, dst)
      if None in paths:
        yield Skip("missing_image", len(requests))
        continue
      for k, request in enumerate(requests):
        yield Candidate(f"{pid}_{k}", functools.partial(_pair_example, f"{pid}_{k}", pid, paths, request),
                        ("input_image", "target_image"))


def _pair_example(key, pid, paths, request):
  return example(key, pid, 0, read_bytes(paths[0]), read_bytes(paths[1]), request)


def _first_file(root, names, folders=("", "annotations")):
  for folder in folders:
    for n in names:
      path = os.path.join(root, folder, n)
      if os.path.isfile(path):
        return path
  return None


class Evr(PairSet):
  MANUAL_DOWNLOAD_INSTRUCTIONS = "EVR's {train,valid,test}.json and its images/ folder."

  def _split_file(self, split):
    return _first_file(self.source_dir, [f"{n}.json" for n in SPLITS[split]])

  def _pairs(self, split):
    records = load_json(self._split_file(split))
    for n, rec in enumerate(records if isinstance(records, list) else []):
      if not isinstance(rec, dict) or not isinstance(rec.get("img0"), str) or not isinstance(rec.get("img1"), str):
        yield Skip("malformed_record")
        continue
      yield str(rec.get("uid", n)), rec["img0"], rec["img1"], texts(rec.get("sents"))


@dataclasses.dataclass
class GierConfig(tfds.core.BuilderConfig):
  request_fields: tuple = ("request", "expert_summary", "amateur_summary")


class Gier(PairSet):
  BUILDER_CONFIGS = [GierConfig(name="default")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "GIER's split JSON files and its images/ folder."

  def _split_file(self, split):
    return _first_file(self.source_dir, [f"{n}.json" for n in SPLITS[split]])

  def _pairs(self, split):
    records = load_json(self._split_file(split))
    if isinstance(records, dict):
      records = [dict(v, id=k) if isinstance(v, dict) else v for k, v in records.items()]
    for n, rec in enumerate(records if isinstance(records, list) else []):
      if not isinstance(rec, dict) or not isinstance(rec.get("input"), str) or not isinstance(rec.get("output"), str):
        yield Skip("malformed_record")
        continue
      requests = [t for f in self.builder_config.request_fields for t in texts(rec.get(f))]
      pid = str(rec.get("id", os.path.splitext(os.path.basename(rec["input"]))[0] or n))
      yield pid, rec["input"], rec["output"], requests


class Ma5k(PairSet):
  MANUAL_DOWNLOAD_INSTRUCTIONS = "MA5k-Req's FiveK.json, annotations/ and images/."

  def _split_file(self, split):
    return _first_file(self.source_dir, [f"{n}_sess_1.json" for n in SPLITS[split]], ("annotations", ""))

  def _pairs(self, split):
    table = load_json(os.path.join(self.source_dir, "FiveK.json"))
    ids = load_json(self._split_file(split))
    for item in ids if isinstance(ids, list) else []:
      pid = item.get("id") if isinstance(item, dict) else item
      rec = table.get(str(pid)) if isinstance(table, dict) and pid is not None else None
      if isinstance(item, dict) and rec is None and "input" in item:
        rec = item                      # a split file may hold whole records
      if not isinstance(rec, dict) or not isinstance(rec.get("input"), str) or not isinstance(rec.get("output"), str):
        yield Skip("malformed_record")
        continue
      yield str(pid), rec["input"], rec["output"], texts(rec.get("request"))


BUILDERS = {"evr": Evr, "gier": Gier, "ma5k": Ma5k}


def build(name: str, source_dir: str, data_dir: str, overwrite: bool = False, **kw):
  if not os.path.isdir(source_dir):
    raise FileNotFoundError(source_dir)
  cls = BUILDERS[name]
  if name == "ma5k" and not os.path.isfile(os.path.join(source_dir, "FiveK.json")):
    raise ValueError(f"{source_dir} has no FiveK.json: not the MA5k-Req release")
  make = lambda: cls(data_dir=data_dir, file_format="array_record", source_dir=source_dir, **kw)
  builder = make()
  if not builder.split_names():
    raise ValueError(f"{source_dir} holds none of the split files of {name}")
  return prepare(make, source_dir, overwrite)
