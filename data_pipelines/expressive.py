"""Regenerate MGIE's expressive instructions for IPr2Pr (the official notebook's procedure, see
mgie_jax.inference.annotate), sharded over hosts and devices and resumable.

  python -m data_pipelines.expressive --source=/data/clip-filtered-dataset \\
      --llava=/ckpt/LLaVA-7B-v1 --vision_tower=/ckpt/clip-vit-large-patch14 \\
      --summarizer=/ckpt/flan-t5-11b-summarizer-filtered --out=/data/expressive.json

--source is the IPr2Pr folder release (seeds.json + prompt folders) or a dataset built by
`python -m data_pipelines.build ipr2pr` (its <data_dir>/ipr2pr/<source>/1.0.0 folder). Each host
takes every host_count-th example (jax.process_index / process_count, or --host_index /
--host_count) and appends one JSON line per example to <out>.parts/part-<host>.jsonl: a restart
skips every key found in any part file, and whichever host sees every key done writes --out, keyed
"<folder>_<seed>_0" as the ipr2pr builder joins it ({"instruction", "expressive"}), in listing order:
the same bytes however the work was split or interrupted. Images that cannot be decoded and answers
that clean up to nothing are recorded as skipped and counted by reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from data_pipelines.command_line import Parser, run_command
from mgie_jax.convert import from_pretrained
from mgie_jax.core import errors


def parse(argv=None):
  p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--source", required=True, help="IPr2Pr folder release, or a built ipr2pr dataset folder")
  p.add_argument("--llava", required=True, help="LLaVA v1 folder (LLaVA-7B-v1 with tokenizer.model)")
  p.add_argument("--vision_tower", help="CLIP folder, if the LLaVA folder's mm_vision_tower is not local")
  p.add_argument("--summarizer", required=True, help="T5ForConditionalGeneration folder with spiece.model")
  p.add_argument("--out", required=True, help="the merged expressive-instruction JSON")
  p.add_argument("--batch_size", type=int, default=8, help="examples per step on each host")
  p.add_argument("--max_new_tokens", type=int, default=1024, help="LLaVA answer limit (the notebook's)")
  p.add_argument("--chunk", type=int, default=32, help="tokens decoded between checks of the answers")
  p.add_argument("--no_early_stop", action="store_true", help="decode every answer to </s> or the limit")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
  p.add_argument("--limit", type=int, default=0, help="only the first N examples (cost measurements)")
  p.add_argument("--host_index", type=int, help="default: jax.process_index()")
  p.add_argument("--host_count", type=int, help="default: jax.process_count()")
  p.add_argument("--verbose", action="store_true", help="tracebacks for user errors")
  return p.parse_args(argv)


# --- the source --------------------------------------------------------------------------------

def source_kind(path: str) -> str:
  if os.path.exists(os.path.join(path, "seeds.json")):
    return "folder"
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return "built"
  raise errors.NOT_A_RELEASE(path=path, what="an IPr2Pr folder release or a built ipr2pr dataset",
                             flag="--source", needs="seeds.json (release) or dataset_info.json (built dataset)")


def listing(path: str) -> tuple[list[tuple[str, str, object]], dict]:
  """[(key, instruction, read_image_bytes)] in a fixed order, and skipped counts by reason."""
  skipped: dict[str, int] = {}
  rows = []
  if source_kind(path) == "folder":
    from data_pipelines.ipr2pr.ipr2pr import read_prompt
    with open(os.path.join(path, "seeds.json")) as f:
      seeds = json.load(f)
    for folder, folder_seeds in seeds:
      texts, reason = read_prompt(os.path.join(path, folder, "prompt.json"))
      if reason:
        skipped[reason] = skipped.get(reason, 0) + len(folder_seeds)
        continue
      for seed in folder_seeds:
        image = os.path.join(path, folder, f"{seed}_0.jpg")
        rows.append((f"{folder}_{seed}_0", texts["edit"], _file_reader(image)))
  else:
    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory(path)
    for split in builder.info.splits:
      source = builder.as_data_source(split)
      for i in range(len(source)):
        rec = source[i]
        rows.append((_text(rec["key"]), _text(rec["instruction"]), _record_reader(source, i)))
  return rows, skipped


def _text(v):
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _file_reader(path):
  def read():
    if not os.path.exists(path):
      return None
    with open(path, "rb") as f:
      return f.read()
  return read


def _record_reader(source, i):
  return lambda: source[i]["input_image"]


# --- resumable per-host parts ----------------------------------------------------------------

def parts_dir(out: str) -> str:
  return out + ".parts"


def read_parts(folder: str) -> dict:
  """key -> record from every part file (a torn last line from a kill is ignored)."""
  done = {}
  if not os.path.isdir(folder):
    return done
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".jsonl"):
      continue
    with open(os.path.join(folder, name), encoding="utf-8") as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(rec, dict) and "key" in rec:
          done.setdefault(rec["key"], rec)
  return done


def open_part(folder: str, host: int):
  """This host's part file for appending, cut back to its last complete line first."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"part-{host:05d}.jsonl")
  if os.path.exists(path):
    with open(path, "rb+") as f:
      data = f.read()
      f.truncate(data.rfind(b"\n") + 1)
  return open(path, "a", encoding="utf-8")


def merge(rows, done: dict, out: str) -> dict:
  """Write the merged JSON (atomically) once every listed key is done; returns the counts."""
  table, skipped = {}, {}
  for key, _, _ in rows:
    rec = done[key]
    if "skipped" in rec:
      skipped[rec["skipped"]] = skipped.get(rec["skipped"], 0) + 1
    else:
      table[key] = {"instruction": rec["instruction"], "expressive": rec["expressive"]}
  tmp = f"{out}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(table, f, indent=2, ensure_ascii=False)
    f.write("\n")
  os.replace(tmp, out)
  return {"annotated": len(table), "skipped": skipped}


# --- the command -------------------------------------------------------------------------------

def check(a) -> None:
  """Every argument mistake, before a model is read."""
  fixes = {"source": "give the IPr2Pr release folder or a built ipr2pr dataset folder",
           "llava": "give the LLaVA v1 folder (weights, config.json, tokenizer.model)",
           "summarizer": "give the Flan-T5 summariser folder (weights, config.json, spiece.model)"}
  for flag, fix in fixes.items():
    if not os.path.isdir(getattr(a, flag)):
      raise errors.FOLDER_MISSING(flag=f"--{flag}", path=getattr(a, flag), fix=fix)
  source_kind(a.source)
  if not os.path.exists(os.path.join(a.llava, "tokenizer.model")):
    raise errors.NOT_A_RELEASE(path=a.llava, what="a LLaVA folder with its tokenizer", flag="--llava",
                               needs="config.json, the weights and tokenizer.model")
  if not os.path.exists(os.path.join(a.summarizer, "spiece.model")):
    raise errors.NOT_A_RELEASE(path=a.summarizer, what="a T5 folder with its tokenizer", flag="--summarizer",
                               needs="config.json, the weights and spiece.model")
  if a.vision_tower and not os.path.isdir(a.vision_tower):
    raise errors.FOLDER_MISSING(flag="--vision_tower", path=a.vision_tower, fix="give the CLIP vision folder")
  out_dir = os.path.dirname(os.path.abspath(a.out))
  if not os.path.isdir(out_dir):
    raise errors.FOLDER_MISSING(flag="--out's folder", path=out_dir, fix="create it first")
  for name in ("batch_size", "max_new_tokens", "chunk"):
    if getattr(a, name) < 1:
      raise errors.FLAG_MISSING(detail=f"--{name} must be at least 1")
  if (a.host_index is None) != (a.host_count is None):
    raise errors.FLAG_MISSING(detail="give --host_index and --host_count together")
  if a.host_count is not None and not 0 <= a.host_index < a.host_count:
    raise errors.FLAG_MISSING(detail=f"--host_index must be in [0, {a.host_count})")


def main(argv=None):
  run_command(parse(argv), check, run)


def run(a):
  import jax

  from mgie_jax.core import parallel
  if a.host_count is None:
    parallel.init_distributed()      # a TPU pod / SLURM job: jax.process_index() names this host
  rows, listing_skips = listing(a.source)
  if a.limit:
    rows = rows[:a.limit]
  host, hosts = (a.host_index, a.host_count) if a.host_count else (jax.process_index(), jax.process_count())
  folder = parts_dir(a.out)
  done = read_parts(folder)
  mine = [r for n, r in enumerate(rows) if n % hosts == host and r[0] not in done]
  print(f"{len(rows)} examples ({sum(listing_skips.values())} unusable in the listing: {listing_skips}); "
        f"host {host}/{hosts}: {len(mine)} to annotate, {len(done)} done before", file=sys.stderr)
  if a.batch_size % jax.local_device_count():
    raise errors.BATCH_MESH(name="--batch_size", batch=a.batch_size, ways=jax.local_device_count(),
                            suggestion=jax.local_device_count() * max(1, a.batch_size // jax.local_device_count()))
  if mine:
    annotate(a, mine, folder, host)
  done = read_parts(folder)
  if all(k in done for k, _, _ in rows):
    counts = merge(rows, done, a.out)
    print(json.dumps({"out": a.out, **counts, "unusable_in_listing": listing_skips}))
  else:
    print(f"host {host} finished; {a.out} is written when every host has", file=sys.stderr)


def annotate(a, mine, folder: str, host: int):
  import jax
  import jax.numpy as jnp

  from mgie_jax.core import parallel
  from mgie_jax.core.images import BadImage, check_image, clip_view, decode_rgb
  from mgie_jax.inference import annotate as annotation
  from mgie_jax.models import LlavaForConditionalGeneration
  from mgie_jax.models.t5 import T5ForConditionalGeneration
  from mgie_jax.text.t5_tokenizer import T5Tokenizer
  from mgie_jax.text.tokenizer import LLAVA_V1_TOKENS, LlamaTokenizer

  dtype = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
  # This host's devices: parameters FSDP-sharded by the logical-axis rules, the batch split over them.
  mesh = parallel.make_mesh(devices=jax.local_devices())
  llava = parallel.shard_module(
      from_pretrained(LlavaForConditionalGeneration, a.llava, dtype, vision_tower=a.vision_tower), mesh)
  tok = LlamaTokenizer.from_pretrained(a.llava, extra_tokens=LLAVA_V1_TOKENS)
  t5 = parallel.shard_module(from_pretrained(T5ForConditionalGeneration, a.summarizer, dtype), mesh)
  t5_tok = T5Tokenizer.from_pretrained(a.summarizer)
  settings = annotation.SummarizerSettings.from_folder(a.summarizer)
  size = llava.config.vision.image_size

  from tqdm import tqdm
  part = open_part(folder, host)
  bar = tqdm(total=len(mine), desc=f"host {host}", unit="example", file=sys.stderr, dynamic_ncols=True)
  tokens = 0
  for b in range(0, len(mine), a.batch_size):
    batch, records, good = mine[b:b + a.batch_size], {}, []
    for key, instruction, read in batch:
      data = read()
      try:
        if data is None:
          raise BadImage("missing_image")
        check_image(data)
        good.append((key, instruction, clip_view(decode_rgb(data), size)))
      except BadImage as e:
        records[key] = {"key": key, "skipped": e.reason}
    if good:
      with parallel.activate(mesh):
        tokens += _annotate_batch(a, good, records, llava, tok, t5, t5_tok, settings)
    for key, _, _ in batch:
      part.write(json.dumps(records[key], ensure_ascii=False) + "\n")
    part.flush()
    os.fsync(part.fileno())
    bar.update(len(batch))
    bar.set_postfix(llava_tokens=tokens)
  bar.close()
  part.close()


def _annotate_batch(a, good, records, llava, tok, t5, t5_tok, settings) -> int:
  """LLaVA answers, clean-up and summaries for decodable examples; fills `records`, returns the
  number of LLaVA tokens decoded."""
  from mgie_jax.inference import annotate as annotation

  # Batches padded to batch_size (copies of the last example) keep one compiled shape.
  padded = good + [good[-1]] * (a.batch_size - len(good))
  answers, n = annotation.llava_answers(llava, tok, [g[2] for g in padded], [g[1] for g in padded],
                                        max_new_tokens=a.max_new_tokens, chunk=a.chunk,
                                        early_stop=not a.no_early_stop)
  cleaned = [annotation.clean(t) for t in answers[:len(good)]]
  keep = [(g, c) for g, c in zip(good, cleaned) if c is not None]
  texts = []
  if keep:
    to_summarise = [c for _, c in keep]
    to_summarise += [to_summarise[-1]] * (a.batch_size - len(to_summarise))
    texts = annotation.summaries(t5, t5_tok, to_summarise, settings)[:len(keep)]
  for (key, instruction, _), summary in zip([g for g, _ in keep], texts):
    records[key] = {"key": key, "instruction": instruction, "expressive": summary, "llava_tokens": n}
  for g, c in zip(good, cleaned):
    if c is None:
      records[g[0]] = {"key": g[0], "skipped": "empty_answer"}
  return n * len(good)


if __name__ == "__main__":
  main()
