"""Build a dataset as TFDS ArrayRecord (a `tfds build`-style command that needs no TensorFlow).

  python -m data_pipelines.build ipr2pr --source folder --manual_dir /data/clip-filtered-dataset \\
      --data_dir /data/tfds --expressive /data/mgie_expressive.json
  python -m data_pipelines.build ipr2pr --source parquet --manual_dir /data/ipr2pr-parquet --data_dir /data/tfds \\
      --missing_expressive=instruction
  python -m data_pipelines.build synthetic --data_dir /data/tfds [--prompts 200 --seeds 2 --size 256]
  python -m data_pipelines.build magicbrush --source parquet --manual_dir /data/MagicBrush --data_dir /data/tfds
  python -m data_pipelines.build magicbrush --source folder --manual_dir /data/MagicBrush/test --data_dir /data/tfds
  python -m data_pipelines.build evr|gier|ma5k --manual_dir /data/<release> --data_dir /data/tfds

The synthetic dataset is generated into <data_dir>/synthetic_source (images, expressive.json and
a tokenizer/) and built with the same IPr2Pr builder. Prints per-split counts of kept, skipped
(by reason) and converted (by image mode) records; the counts are also saved in the dataset's
metadata. Rebuilding from another source is refused unless --overwrite is given. A mistake in
the arguments is one line on stderr and exit code 2.
"""

import argparse
import json
import os

LAYOUT = """\
The IPr2Pr folder release (--source folder), as --manual_dir:
  clip-filtered-dataset/
    seeds.json                  [["0000000", [1234, 5678]], ...]   (each folder and its seeds)
    0000000/
      prompt.json               {"input": "a photo of a cat", "edit": "make it a dog",
                                 "output": "a photo of a dog"}  (only "edit" is needed)
      1234_0.jpg  1234_1.jpg    the input and the edited image of seed 1234
--expressive: MGIE's expressive instructions, keyed <folder>_<seed>_0
  {"0000000_1234_0": {"instruction": "make it a dog",
                       "expressive": "Replace the cat with a dog sitting in the same spot."}}
(python -m data_pipelines.expressive writes it.)
"""

from data_pipelines.command_line import Parser, run_command
from mgie_jax.core import errors


def parse(argv=None):
  p = Parser(description=__doc__, epilog=LAYOUT, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("dataset", choices=["ipr2pr", "synthetic", "magicbrush", "evr", "gier", "ma5k"])
  p.add_argument("--data_dir", required=True, help="where the TFDS dataset is written")
  p.add_argument("--source", choices=["folder", "parquet"], default=None,
                 help="ipr2pr: folder (default) or parquet; magicbrush: parquet (train/dev, default) or "
                      "folder (the test release)")
  p.add_argument("--manual_dir", help="the source release's folder")
  p.add_argument("--expressive", help="MGIE expressive-instruction JSON keyed <folder>_<seed>_0")
  p.add_argument("--missing_expressive", choices=["instruction", "skip"],
                 help="examples without an expressive instruction: use the terse instruction as the "
                      "target, or skip them (counted either way); required without --expressive")
  p.add_argument("--overwrite", action="store_true", help="rebuild a dataset built from another source")
  p.add_argument("--prompts", type=int, default=200, help="synthetic: number of edit prompts (default 200)")
  p.add_argument("--seeds", type=int, default=2, help="synthetic: image pairs per prompt (default 2)")
  p.add_argument("--size", type=int, default=256, help="synthetic: image side in pixels (default 256)")
  p.add_argument("--seed", type=int, default=0, help="synthetic: generator seed (default 0)")
  p.add_argument("--verbose", action="store_true", help="tracebacks for user errors")
  return p.parse_args(argv)


def check(a) -> None:
  """Everything about the arguments that can go wrong, before anything is read or written."""
  from data_pipelines.ipr2pr.ipr2pr import load_expressive
  if a.dataset == "synthetic":
    return
  if not a.manual_dir:
    raise errors.FLAG_MISSING(detail=f"{a.dataset} needs --manual_dir")
  if not os.path.isdir(a.manual_dir):
    raise errors.SOURCE_MISSING(flag="--manual_dir", path=a.manual_dir)
  if a.dataset != "ipr2pr":
    return check_eval_source(a)
  a.source = a.source or "folder"
  if a.source == "folder" and not os.path.exists(os.path.join(a.manual_dir, "seeds.json")):
    raise errors.NOT_A_RELEASE(path=a.manual_dir, what="an IPr2Pr folder release (no seeds.json)",
                               flag="--manual_dir", needs="seeds.json and the prompt folders")
  if a.source == "parquet" and not any(f.endswith(".parquet") for f in os.listdir(a.manual_dir)):
    raise errors.NOT_A_RELEASE(path=a.manual_dir, what="a folder of IPr2Pr parquet files",
                               flag="--manual_dir", needs="the *.parquet files")
  if a.expressive:
    if not os.path.isfile(a.expressive):
      raise errors.BAD_JSON(flag="--expressive", path=a.expressive, detail="no such file",
                            fix="give the JSON written by python -m data_pipelines.expressive")
    try:
      load_expressive(a.expressive)
    except (ValueError, UnicodeDecodeError) as e:
      raise errors.BAD_JSON(flag="--expressive", path=a.expressive, detail=str(e).splitlines()[0][:200],
                            fix="give a JSON object keyed <folder>_<seed>_0") from None
  elif not a.missing_expressive:
    raise errors.EXPRESSIVE_CHOICE()


def check_eval_source(a) -> None:
  from data_pipelines.eval_sets.magicbrush import test_root
  from data_pipelines.eval_sets.pairs import BUILDERS
  if a.dataset == "magicbrush":
    a.source = a.source or "parquet"
    if a.source == "folder":
      try:
        test_root(a.manual_dir)
      except ValueError:
        raise errors.NOT_A_RELEASE(path=a.manual_dir, what="the MagicBrush test release (no edit_sessions.json)",
                                   flag="--manual_dir", needs="edit_sessions.json and images/") from None
    return
  builder = BUILDERS[a.dataset](data_dir=a.data_dir, file_format="array_record", source_dir=a.manual_dir)
  if not builder.split_names():
    raise errors.NOT_A_RELEASE(path=a.manual_dir, what=f"a {a.dataset} release (no split files)",
                               flag="--manual_dir", needs=builder.MANUAL_DOWNLOAD_INSTRUCTIONS)


def main(argv=None):
  run_command(parse(argv), check, run)


def run(a):
  from data_pipelines import synthetic
  from data_pipelines.checked import SourceChanged
  from data_pipelines.ipr2pr import build
  try:
    if a.dataset == "synthetic":
      src = os.path.join(a.data_dir, "synthetic_source")
      synthetic.write_dataset(src, a.prompts, a.seeds, a.size, a.seed)
      builder = build(src, a.data_dir, "folder", os.path.join(src, "expressive.json"), overwrite=a.overwrite)
      print(f"tokenizer: {os.path.join(src, 'tokenizer')}")
    elif a.dataset == "ipr2pr":
      builder = build(a.manual_dir, a.data_dir, a.source, a.expressive, a.missing_expressive,
                      overwrite=a.overwrite)
    else:
      from data_pipelines.eval_sets import build as build_eval
      builder = build_eval(a.dataset, a.manual_dir, a.data_dir, a.source or "parquet", overwrite=a.overwrite)
  except SourceChanged as e:
    raise errors.SOURCE_CHANGED(dataset=e.dataset, old=e.old, new=e.new) from None
  print(f"dataset: {builder.data_dir}")
  print(json.dumps({"splits": {k: v.num_examples for k, v in builder.info.splits.items()},
                    **dict(builder.info.metadata)}, indent=1))


if __name__ == "__main__":
  main()
