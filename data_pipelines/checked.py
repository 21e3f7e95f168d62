"""What every dataset builder here shares: check every record, then write only the good ones.

A builder lists candidate records per split. The first pass reads and decodes each candidate
(undecodable images, missing files, malformed text are skipped and counted by reason; images in
other modes than RGB are kept and counted by mode, the loader converts them); the second pass
reads the good ones again and yields them to TFDS. A split with no usable record is left out
with a warning instead of failing the whole build. Counts, the source and its fingerprint go to
the dataset's metadata; a rebuild from a different source is refused unless asked to overwrite,
and the old dataset is kept until the new one is complete.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable

import tensorflow_datasets as tfds

from mgie_jax.core.images import MAX_PIXELS, BadImage, check_image

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Candidate:
  key: str
  read: Callable[[], dict]          # -> the example (reads its files again on each call)
  images: tuple = ()                # fields of the example that hold encoded images to check
  notes: tuple = ()                 # counted but kept, e.g. "expressive_fallback"
  drop: str | None = None           # a reason to skip it once it is otherwise good (counted so)


@dataclasses.dataclass
class Skip:
  reason: str
  count: int = 1


class SourceChanged(ValueError):
  def __init__(self, dataset: str, old: str, new: str):
    self.dataset, self.old, self.new = dataset, old, new
    super().__init__(f"{dataset} was built from {old}, not from {new}")


class CheckedBuilder(tfds.core.GeneratorBasedBuilder):
  """Subclasses implement `_candidates(split) -> iterable of Candidate | Skip`, `split_names()`
  and `source_description()`."""

  max_pixels = MAX_PIXELS

  def split_names(self) -> list[str]:
    raise NotImplementedError

  def _candidates(self, split: str) -> Iterable:
    raise NotImplementedError

  def source_description(self) -> dict:
    """What the dataset is built from (paths and options), recorded and compared on rebuilds."""
    raise NotImplementedError

  # --- TFDS hooks -------------------------------------------------------------------------------
  def _split_generators(self, dl_manager):
    if not getattr(self, "source_dir", None):
      self.source_dir = str(dl_manager.manual_dir)
    out, empty = {}, []
    meta = self.info.metadata
    for split in self.split_names():
      good, skipped, converted, notes = self._scan(split)
      meta.setdefault("kept", {})[split] = len(good)
      meta.setdefault("skipped", {})[split] = dict(sorted(skipped.items()))
      meta.setdefault("converted", {})[split] = dict(sorted(converted.items()))
      meta.setdefault("notes", {})[split] = dict(sorted(notes.items()))
      self._report(split, len(good), skipped, converted, notes)
      if good:
        out[split] = self._generate_examples(good)
      else:
        empty.append(split)
    meta["empty_splits"] = empty
    meta["source"] = self.source_description()
    meta["fingerprint"] = fingerprint(meta["source"])
    for split in empty:
      print(f"[{self._label()}] WARNING: split {split!r} has no usable example "
            "and is not written", flush=True)
    if not out:
      raise ValueError(f"no usable example in any split of {self.source_dir}")
    return out

  def _generate_examples(self, good):
    for cand in good:
      yield cand.key, cand.read()

  # --- the checking pass ----------------------------------------------------------------------
  def _scan(self, split):
    good, skipped, converted, notes = [], collections.Counter(), collections.Counter(), collections.Counter()
    for cand in self._candidates(split):
      if isinstance(cand, Skip):
        skipped[cand.reason] += cand.count
        continue
      try:
        example = cand.read()
      except BadImage as e:
        skipped[e.reason] += 1
        continue
      modes = []
      try:
        for field in cand.images:
          _, mode = check_image(example[field], self.max_pixels)
          modes.append(mode)
      except BadImage as e:
        skipped[e.reason] += 1
        continue
      if cand.drop:
        skipped[cand.drop] += 1
        continue
      converted.update(m for m in modes if m != "RGB")
      notes.update(cand.notes)
      good.append(cand)
    return good, skipped, converted, notes

  def _label(self) -> str:
    config = getattr(self.builder_config, "name", None)
    return f"{self.name}/{config}" if config else self.name

  def _report(self, split, kept, skipped, converted, notes):
    fmt = lambda c: ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"
    line = f"[{self._label()}] {split}: kept {kept}, skipped {sum(skipped.values())} ({fmt(skipped)})"
    if converted:
      line += f", converted to RGB: {fmt(converted)}"
    if notes:
      line += f", {fmt(notes)}"
    print(line, flush=True)


def fingerprint(source: dict) -> str:
  """What the data is, not where it lies: the source's contents and the build options (a moved
  or copied source, e.g. inside a moved workdir, is the same source). File paths are left out."""
  keep = {k: v for k, v in source.items() if k not in ("dir", "expressive")}
  return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | None) -> str | None:
  if not path:
    return None
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()[:16]


def listing_digest(root: str, names: Iterable[str]) -> str:
  """A cheap fingerprint of files: names, sizes and modification times."""
  rows = []
  for n in sorted(names):
    st = os.stat(os.path.join(root, n))
    rows.append(f"{n}:{st.st_size}:{int(st.st_mtime)}")
  return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def prepare(make_builder: Callable[[], CheckedBuilder], source_dir: str, overwrite: bool = False):
  """Build (or reuse) a dataset. An existing one built from another source (or with other
  options) is refused unless `overwrite`; then it is moved aside and deleted only once the new
  one is complete (restored if the build fails)."""
  builder = make_builder()
  data_dir = str(builder.data_dir)
  meta_path = os.path.join(data_dir, "metadata.json")
  aside = None
  if os.path.exists(os.path.join(data_dir, "dataset_info.json")):
    old = {}
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        old = json.load(f)
    new = builder.source_description()
    if old.get("fingerprint") == fingerprint(new):
      return builder
    if "fingerprint" not in old:     # built before sources were recorded: cannot tell, reuse
      log.warning("%s records no source; reusing it as it is (pass --overwrite to rebuild)", data_dir)
      return builder
    if not overwrite:
      was, now = describe(old.get("source")), describe(new)
      if was == now:
        now += " (same path and options, different contents)"
      raise SourceChanged(data_dir, was, now)
    aside = f"{data_dir}.replaced-{int(time.time())}"
    os.rename(data_dir, aside)
    builder = make_builder()
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(source_dir)))
  except BaseException:
    if aside and not os.path.exists(data_dir):
      os.rename(aside, data_dir)
    raise
  if aside:
    shutil.rmtree(aside, ignore_errors=True)
  return builder


def describe(source: dict | None) -> str:
  if not source:
    return "an unrecorded source"
  parts = [str(source.get("dir"))]
  for k, v in sorted(source.items()):
    if k not in ("dir", "digest") and v not in (None, "", [], {}):
      parts.append(f"{k}={v}")
  return " ".join(parts)
