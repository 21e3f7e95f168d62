"""The grain loader: TFDS ArrayRecord data source -> MGIE training batches on every host.

  source -> this host's disjoint slice -> seeded shuffle (new order each epoch) -> repeat
  -> decode + MGIE preprocessing + tokenisation (bad records counted and skipped)
  -> per-shard batches -> threads (and optionally worker processes) prefetching
  -> this host's shards concatenated (HostLoader).

Batches are dicts of numpy arrays: the fields of mgie_jax.run.batch.BatchSpec (whose
`loader_options()` fill the shape fields of LoaderConfig), plus `key` (bytes [B], the record's
key, for tracing; not for the device). Token arrays only when a tokenizer is given.
The iterator's state (`get_state`/`set_state`, or grain's Orbax handler) restores exactly.
With a frozen-feature cache (`features`, data_pipelines.features) each record's cached VAE
posteriors and CLIP features replace its images: nothing is decoded.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from data_pipelines import feature_cache
from mgie_jax.core.images import BadImage, clip_view, decode_rgb, mgie_square, to_model_range
from mgie_jax.text import IGNORE_INDEX, LlamaTokenizer, training_example

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  data_dir: str                      # a built dataset version folder, e.g. .../ipr2pr/folder/1.0.0
  split: str = "train"
  batch_size: int = 8                # per host
  resolution: int = 256
  clip_resolution: int = 224
  tokenizer: str | None = None       # folder with tokenizer.model; None: images and text only
  max_length: int = 512
  num_image_tokens: int = 256
  text_length: int = 0               # > 0: also instruction_ids / instruction_mask (the terse
                                     # instruction alone, bos ... eos, for a text-only editor)
  random_flip: bool = False          # off in MGIE: "move it to the left" would lie after a flip
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = None      # None: repeat forever
  num_threads: int = 8
  prefetch: int = 64
  worker_count: int = 0              # > 0: decode in that many worker processes
  drop_remainder: bool = True
  features: str = ""                 # a frozen-feature cache of this dataset (data_pipelines.features):
                                     # its fields replace the images
  feature_fields: tuple = ()         # ((name, shape), ...) the batch expects from the cache
  template: str = "llava_v1"         # the prompt (mgie_jax.text.template.TEMPLATES)
  expressive: str = ""               # {key: expressive instruction} JSON for records without one (a
                                     # benchmark's train split); missing there: the instruction, counted


class Preprocess:
  """Decode one record and apply MGIE's preprocessing; returns None (counted) for bad records."""

  def __init__(self, cfg: LoaderConfig):
    self.cfg = cfg
    self.tokenizer = None
    if cfg.tokenizer:
      self.tokenizer = LlamaTokenizer.from_pretrained(cfg.tokenizer)
      self._img0 = self.tokenizer.token_to_id("[IMG0]")
    self.skipped = collections.Counter()
    self.substituted = collections.Counter()   # records trained with the instruction as expressive target
    self._lock = threading.Lock()
    self._expressive = _read_expressive(cfg.expressive) if cfg.expressive else {}
    self._meta = None
    if cfg.features:
      self._meta = feature_cache.read_meta(cfg.features)
      if tuple(self._meta.fields) != tuple((n, tuple(sh)) for n, sh in cfg.feature_fields):
        raise ValueError(f"the feature cache in {cfg.features} holds {list(self._meta.fields)}, "
                         f"this model reads {list(cfg.feature_fields)}")

  # Worker processes receive a pickled copy (each counts its own skips).
  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _skip(self, reason: str, key) -> None:
    with self._lock:
      self.skipped[reason] += 1
      n = sum(self.skipped.values())
    log.warning("skipping record %s (%s); %d skipped so far: %s", key, reason, n, dict(self.skipped))

  def _expressive_of(self, record, key, text) -> str:
    """The record's expressive instruction, the --expressive file's, or (counted) the instruction."""
    if "expressive" in record and text("expressive").strip():
      return text("expressive")
    name = key.decode() if isinstance(key, bytes) else str(key)
    if self._expressive.get(name, "").strip():
      return self._expressive[name]
    with self._lock:
      self.substituted["instruction_as_expressive"] += 1
      n = self.substituted["instruction_as_expressive"]
    if n == 1 or n % 1000 == 0:
      log.warning("%d record(s) without an expressive instruction train on the instruction itself (e.g. %s)", n, name)
    return text("instruction")

  def _cached(self, record, key):
    """The cached frozen features of a record (None when the cache recorded it as skipped)."""
    meta = self._meta
    cached_key, arrays, reason = feature_cache.unpack(record["features"], meta)
    if cached_key != (key if isinstance(key, bytes) else str(key).encode()):
      raise ValueError(f"the feature cache's record for {key!r} is {cached_key!r}: it was made from "
                       f"another dataset; make it again with python -m data_pipelines.features")
    if arrays is None:
      self._skip(reason, key)
      return None
    return {"key": np.asarray(key), **arrays}

  def __call__(self, record, rng: np.random.Generator | None = None):
    key = record.get("key", b"?")
    if "features" in record:
      out = self._cached(record, key)
      return None if out is None else self._tokens(record, key, out)
    out, reason = self.images(record, rng)
    if out is None:
      self._skip(reason, key)
      return None
    return self._tokens(record, key, out)

  def images(self, record, rng: np.random.Generator | None = None) -> tuple[dict | None, str]:
    """(the record's key and model-ready images, "") or (None, why it cannot be used)."""
    try:
      # IPr2Pr records hold edited_image; the benchmarks' (data_pipelines.eval_sets) target_image.
      target = "edited_image" if "edited_image" in record else "target_image"
      src, dst = (mgie_square(decode_rgb(record[k])) for k in ("input_image", target))
    except BadImage as e:
      return None, e.reason
    except Exception as e:     # anything else a corrupt file can raise while decoding
      return None, f"decode_error:{type(e).__name__}"
    if rng is not None and self.cfg.random_flip and rng.random() < 0.5:
      src, dst = src.transpose(Image.FLIP_LEFT_RIGHT), dst.transpose(Image.FLIP_LEFT_RIGHT)
    return {"key": np.asarray(record.get("key", b"?")),
            "input_image": to_model_range(src, self.cfg.resolution),
            "edited_image": to_model_range(dst, self.cfg.resolution),
            "clip_image": clip_view(src, self.cfg.clip_resolution)}, ""

  def _tokens(self, record, key, out):
    if self.tokenizer is not None:
      text = lambda k: record[k].decode("utf-8") if isinstance(record[k], bytes) else record[k]
      try:
        ex = training_example(self.tokenizer, text("instruction"), self._expressive_of(record, key, text),
                              num_image_tokens=self.cfg.num_image_tokens, max_length=self.cfg.max_length,
                              template=self.cfg.template)
      except ValueError:
        self._skip("too_long", key)
        return None
      if self._img0 not in ex.input_ids:     # no [IMG] window: nothing for the edit head to read
        self._skip("no_img_tokens", key)
        return None
      n = len(ex.input_ids)
      pad = self.cfg.max_length - n
      out["input_ids"] = np.pad(ex.input_ids, (0, pad)).astype(np.int32)
      out["labels"] = np.pad(ex.labels, (0, pad), constant_values=IGNORE_INDEX).astype(np.int32)
      out["attention_mask"] = (np.arange(self.cfg.max_length) < n).astype(np.int32)
      if self.cfg.text_length:
        ids = self.tokenizer.encode(text("instruction"))[:self.cfg.text_length - 1] + [self.tokenizer.eos_id]
        out["instruction_ids"] = np.pad(np.asarray(ids, np.int32), (0, self.cfg.text_length - len(ids)))
        out["instruction_mask"] = (np.arange(self.cfg.text_length) < len(ids)).astype(np.int32)
    return out


def _read_expressive(path: str) -> dict:
  """{key: text} from data_pipelines.expressive's output ({key: {"expressive": ...}}) or a plain {key: text}."""
  with open(path) as f:
    raw = json.load(f)
  return {k: (v.get("expressive", "") if isinstance(v, dict) else str(v)) for k, v in raw.items()}


class _RandomPreprocess(grain.transforms.RandomMap):
  def __init__(self, fn: Preprocess):
    self.fn = fn

  def random_map(self, record, rng):
    return self.fn(record, rng)


def open_source(data_dir: str, split: str, features: str = ""):
  """A split's records; with `features` (a frozen-feature cache folder), each with its cache record."""
  builder = tfds.builder_from_directory(data_dir)
  if split not in builder.info.splits:
    raise ValueError(f"{data_dir} has splits {list(builder.info.splits)}, not {split!r}")
  source = builder.as_data_source(split)
  return feature_cache.JoinedSource(source, features, split) if features else source


def make_dataset(cfg: LoaderConfig, shard_index: int = 0, shard_count: int = 1,
                 preprocess: Preprocess | None = None) -> grain.IterDataset:
  """One data shard's pipeline as a grain IterDataset (checkpointable when iterated)."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} must be in [0, {shard_count})")
  source = open_source(cfg.data_dir, cfg.split, cfg.features)
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f"data shard {shard_index}/{shard_count} gets no examples of {cfg.split!r}")
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  ds = ds.repeat(cfg.num_epochs)
  fn = preprocess or Preprocess(cfg)
  ds = ds.random_map(_RandomPreprocess(fn), seed=cfg.seed) if cfg.random_flip else ds.map(fn)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch))
  it = it.filter(lambda x: x is not None).batch(cfg.batch_size, drop_remainder=cfg.drop_remainder)
  if cfg.worker_count > 0:
    if not flags.FLAGS.is_parsed():   # grain's workers read absl flags; outside absl.app, use defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
  return it


class HostLoader:
  """This host's batches: the concatenation of its data shards' batches.

  The global batch is fixed by the number of data shards, not by the number of hosts reading
  them: with S shards, shard s contributes examples s, s + S, ... in its own shuffled order,
  B / S of them per global batch. Any process count dividing S reads the same global batches,
  so a run on 2 hosts reproduces a run on 1. Checkpointable through grain's Orbax handler.
  """

  def __init__(self, iterators):
    self.iterators = list(iterators)

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self.iterators]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:
    return json.dumps([it.get_state() for it in self.iterators]).encode()

  def set_state(self, state) -> None:
    states = json.loads(state)
    if len(states) != len(self.iterators):
      raise ValueError(f"iterator state holds {len(states)} shards, this host reads {len(self.iterators)}")
    for it, st in zip(self.iterators, states):
      it.set_state(st)

  def start_prefetch(self) -> None:
    for it in self.iterators:
      if hasattr(it, "start_prefetch"):
        it.start_prefetch()


def make_loader(cfg: LoaderConfig, process_index: int | None = None, process_count: int | None = None,
                data_shards: int = 0) -> HostLoader:
  """This host's batch iterator (cfg.batch_size per host); data_shards=0 means one per process."""
  if process_index is None or process_count is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  shards = data_shards or process_count
  if shards % process_count:
    raise ValueError(f"data_shards {shards} must be a multiple of the process count {process_count}")
  mine = shards // process_count
  if cfg.batch_size % mine:
    raise ValueError(f"per-host batch {cfg.batch_size} does not split over {mine} data shards")
  shard_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size // mine)
  preprocess = Preprocess(cfg)
  return HostLoader(iter(make_dataset(shard_cfg, process_index * mine + i, shards, preprocess))
                    for i in range(mine))
