"""Run the frozen towers once: cache the VAE posteriors and CLIP features of a built dataset.

  python -m data_pipelines.features --config=configs/ipr2pr_lora.py --splits=train
  python -m mgie_jax.train --config=configs/ipr2pr_lora.py --workdir=DIR \\
      --config.data.features=<data_dir>/frozen_features

The training recipe trains neither the VAE nor the CLIP tower, yet encodes every image with both
on every step. This command runs them over the dataset with the training config's own models and
dtypes, and writes what the loss reads (mgie_jax.models.mgie.FEATURES) beside the dataset
(default `<config.data.dir>/frozen_features`, format in data_pipelines/feature_cache.py): the
posterior's mean and log-variance, so that training still draws the target latent from its own
noise, and the CLIP features before the projector, which may train. The trainer then reads them
instead of the images, and refuses a cache whose fingerprint (of the VAE and CLIP weights and the
settings that shape their outputs) is not the configured models'.

Every host takes every process_count-th shard and runs its batches over its own devices. A shard
file appears only when it is complete, so a killed run loses at most the shards it was writing:
re-running the same command skips the finished ones and writes the same bytes an uninterrupted run
would. Records whose images cannot be decoded are kept as skip records (the loader counts them by
reason, as it counts bad images).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import socket
import sys

from absl import flags
from ml_collections import config_flags

from mgie_jax.core import cli, errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "the training config whose frozen towers to run", lock_config=True)
flags.DEFINE_string("workdir", "", "the run's workdir, where a config without config.data.dir has its "
                    "synthetic data, tokenizer and VAE")
flags.DEFINE_list("splits", ["train"], "dataset splits to cache")
flags.DEFINE_string("out", "", "the cache folder (default: <dataset>/frozen_features)")
flags.DEFINE_integer("batch_size", 16, "examples per step on each host (a multiple of its devices)")
flags.DEFINE_integer("shard_size", 1024, "records per cache file (the unit a restart redoes)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "storage dtype (bfloat16 halves the disk)")
flags.mark_flags_as_required(["config"])

log = logging.getLogger("data_pipelines.features")
SYNTHETIC = os.path.join("data", "tfds", "ipr2pr", "folder", "1.0.0")


def data_dir(c, workdir: str) -> str:
  if c.data.dir:
    return c.data.dir
  if not workdir:
    raise errors.BAD_OPTION(flag="--workdir", detail="config.data.dir is empty: the data is the synthetic "
                            "dataset a train run generates under its workdir",
                            fix="give that --workdir, or a built dataset as --config.data.dir")
  return os.path.join(workdir, SYNTHETIC)


def check(c, workdir: str) -> tuple[str, str]:
  """Everything checkable before a model is built; returns (dataset folder, cache folder)."""
  from data_pipelines import feature_cache
  from mgie_jax.run import model as model_lib
  from mgie_jax.run.checks import check_dataset, check_folder, frozen_feature_towers_trained
  if model_lib.model_kind(c) != "mgie":
    raise errors.BAD_OPTION(flag="--config.model.kind", detail=repr(model_lib.model_kind(c)),
                            fix="frozen features are MGIE's (the VAE posteriors and CLIP features)")
  trained = frozen_feature_towers_trained(c)
  if trained:
    raise errors.FEATURES_TRAINED(detail=trained)
  if model_lib.pretrained(c, "vae") == "synthetic":
    if not workdir:
      raise errors.BAD_OPTION(flag="--workdir", detail="config.pretrained.vae='synthetic' is the VAE a train run "
                              "trains under its workdir", fix="give that --workdir, or a VAE folder as "
                              "--config.pretrained.vae")
    check_folder(model_lib.synthetic_vae_dir(workdir), "--workdir's synthetic VAE (<workdir>/data/vae)")
  data = data_dir(c, workdir)
  check_dataset(data, "config.data.dir" if c.data.dir else "--workdir's synthetic dataset", tuple(FLAGS.splits),
                extra=("" if c.data.dir else ": run the train command once, which generates it"))
  if FLAGS.batch_size < 1 or FLAGS.shard_size < 1:
    raise errors.BAD_OPTION(flag="--batch_size/--shard_size", detail=f"{FLAGS.batch_size}/{FLAGS.shard_size}",
                            fix="use 1 or more")
  out = FLAGS.out or os.path.join(data, "frozen_features")
  if os.path.exists(os.path.join(out, feature_cache.META)):
    meta = feature_cache.read_meta(out)
    sources = model_lib.tower_sources(c, workdir)
    if meta.models != sources or meta.dtype != FLAGS.dtype or meta.shard_size != FLAGS.shard_size:
      raise errors.FEATURES_STALE(path=out, what=f"by {meta.models} in {meta.dtype}, {meta.shard_size} per "
                                  f"shard; this command would use {sources} in {FLAGS.dtype}, {FLAGS.shard_size}")
  return data, out


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
  cli.quiet_libraries()
  c = FLAGS.config
  data, out = check(c, FLAGS.workdir)
  write_cache(c, FLAGS.workdir, data, out, list(FLAGS.splits), FLAGS.batch_size, FLAGS.shard_size, FLAGS.dtype)


def write_cache(c, workdir: str, data: str, out: str, splits, batch_size: int, shard_size: int, dtype: str) -> dict:
  """Write (or finish) the cache; returns the number of records written and skipped per reason."""
  import jax
  import numpy as np
  from array_record.python.array_record_module import ArrayRecordWriter
  from flax import nnx
  from jax.sharding import NamedSharding

  from data_pipelines import feature_cache
  from data_pipelines.loader import LoaderConfig, Preprocess, open_source
  from mgie_jax.core import parallel
  from mgie_jax.models.mgie import feature_shapes, frozen_features
  from mgie_jax.run import model as model_lib
  from mgie_jax.text import LlamaTokenizer

  devices = jax.local_devices()
  if batch_size % len(devices):
    raise errors.BAD_OPTION(flag="--batch_size", detail=f"{batch_size} does not split over this host's "
                            f"{len(devices)} devices", fix=f"use a multiple of {len(devices)}")
  tok = LlamaTokenizer.from_pretrained(model_lib.tokenizer_dir(c, workdir))
  built = model_lib.build(c, tok, workdir)
  mcfg = built.config
  # Each host on its own devices, the towers replicated and the batch split: no collectives.
  local = c.copy_and_resolve_references()
  local.mesh.data, local.mesh.fsdp, local.mesh.tensor = -1, 1, 1
  placed = model_lib.place(local, built, devices)
  towers = model_lib.frozen_towers(c, built, placed)
  resolution = int(c.data.resolution)
  fingerprint = feature_cache.towers_fingerprint(towers, mcfg, resolution)
  sources = {s: open_source(data, s) for s in splits}
  meta = feature_cache.Meta(fingerprint, model_lib.tower_sources(c, workdir), tuple(feature_shapes(mcfg, resolution).items()),
                            dtype, shard_size, {s: len(src) for s, src in sources.items()})
  _write_meta(out, meta)

  vae_def = nnx.graphdef(built.abstract.vae)
  tower_def = nnx.graphdef(built.abstract.mllm.vision_tower)
  batch_sh = NamedSharding(placed.mesh, parallel.logical_to_spec(("batch",), placed.rules))

  @jax.jit
  def encode(towers, images):
    with parallel.activate(placed.mesh, placed.rules):
      vae = nnx.merge(vae_def, towers["vae"])
      tower = nnx.merge(tower_def, towers["mllm"]["vision_tower"])
      return frozen_features(vae, tower, mcfg.llava, images["input_image"], images["edited_image"],
                             images["clip_image"])

  pre = Preprocess(LoaderConfig(data_dir=data, resolution=resolution, clip_resolution=int(mcfg.clip_size)))
  pid, count = jax.process_index(), jax.process_count()
  _remove_stale_partials(out)
  skipped, written = collections.Counter(), 0
  pool = concurrent.futures.ThreadPoolExecutor(max(1, int(c.data.num_threads)))
  for split, source in sources.items():
    n = len(source)
    shards = feature_cache.shard_count(n, shard_size)
    mine = [i for i in range(shards) if i % count == pid]
    size = lambda i: min(n, (i + 1) * shard_size) - i * shard_size
    paths = meta.shard_paths(out, split)
    todo = [i for i in mine if not os.path.exists(paths[i])]
    bar = cli.progress(sum(size(i) for i in mine), f"features {split}", initial=sum(size(i) for i in mine if i not in todo))
    with cli.log_through(cli.interactive()):
      for i in todo:
        partial = f"{paths[i]}.partial-{socket.gethostname()}-{os.getpid()}"
        writer = ArrayRecordWriter(partial, "group_size:1")
        for lo in range(i * shard_size, i * shard_size + size(i), batch_size):
          idx = list(range(lo, min(lo + batch_size, i * shard_size + size(i))))
          records = [source[j] for j in idx]
          decoded = list(pool.map(pre.images, records))
          ok = [d for d, _ in decoded if d is not None]
          feats = {}
          if ok:     # padded to the full batch with the first row: one compiled shape
            rows = ok + [ok[0]] * (batch_size - len(ok))
            images = {k: np.stack([r[k] for r in rows]) for k in ("input_image", "edited_image", "clip_image")}
            feats = jax.device_get(encode(towers, jax.device_put(images, batch_sh)))
          k = 0
          for rec, (d, reason) in zip(records, decoded):
            key = rec.get("key", b"?")
            key = key if isinstance(key, bytes) else str(key).encode()
            if d is None:
              writer.write(feature_cache.pack(key, None, meta, reason))
              skipped[reason] += 1
            else:
              writer.write(feature_cache.pack(key, {name: v[k] for name, v in feats.items()}, meta))
              k += 1
              written += 1
          bar.update(len(idx))
        writer.close()
        os.replace(partial, paths[i])     # complete: now it counts
    bar.close()
  if not written and not skipped:
    log.info("frozen features in %s: complete, nothing to do; train with --config.data.features=%s", out, out)
  else:
    log.info("frozen features in %s: %d records written by this host%s; train with --config.data.features=%s",
             out, written, f", {sum(skipped.values())} skipped {dict(skipped)}" if skipped else "", out)
  return {"written": written, "skipped": dict(skipped)}


def _write_meta(out: str, meta) -> None:
  """Write meta.json (atomically), or check the one there: a cache is never mixed from two models."""
  from data_pipelines import feature_cache
  path = os.path.join(out, feature_cache.META)
  os.makedirs(out, exist_ok=True)
  if os.path.exists(path):
    old = feature_cache.read_meta(out)
    if old.fingerprint != meta.fingerprint or old.fields != meta.fields or old.splits != meta.splits:
      raise errors.FEATURES_STALE(path=out, what=f"with fingerprint {old.fingerprint} for splits {old.splits}; "
                                  f"these models and data give {meta.fingerprint} for {meta.splits}")
    return
  tmp = f"{path}.partial-{socket.gethostname()}-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(meta.to_json())
  os.replace(tmp, path)


def _remove_stale_partials(out: str) -> None:
  """Partial shard files this machine's killed runs left (their process is gone)."""
  host = socket.gethostname()
  for name in os.listdir(out):
    head, sep, tail = name.rpartition(f".partial-{host}-")
    if sep and tail.isdigit() and not _alive(int(tail)):
      os.remove(os.path.join(out, name))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


if __name__ == "__main__":
  cli.run(main)
