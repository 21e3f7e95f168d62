"""Build a dataset as TFDS ArrayRecord (a `tfds build`-style command that needs no TensorFlow).

  python -m data_pipelines.build ipr2pr --source folder --manual_dir /data/clip-filtered-dataset \\
      --data_dir /data/tfds [--expressive /data/mgie_expressive.json]
  python -m data_pipelines.build ipr2pr --source parquet --manual_dir /data/ipr2pr-parquet --data_dir /data/tfds
  python -m data_pipelines.build synthetic --data_dir /data/tfds [--prompts 200 --seeds 2 --size 256]

The synthetic dataset is generated into <data_dir>/synthetic_source (images, expressive.json and
a tokenizer/) and built with the same IPr2Pr builder. Prints per-split counts of kept and
skipped records; the counts are also saved in the dataset's metadata.
"""

import argparse
import json
import os

from data_pipelines import synthetic
from data_pipelines.ipr2pr import build


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("dataset", choices=["ipr2pr", "synthetic"])
  p.add_argument("--data_dir", required=True, help="where the TFDS dataset is written")
  p.add_argument("--source", choices=["folder", "parquet"], default="folder")
  p.add_argument("--manual_dir", help="the IPr2Pr source folder (ipr2pr only)")
  p.add_argument("--expressive", help="MGIE expressive-instruction JSON keyed <folder>_<seed>_0")
  p.add_argument("--prompts", type=int, default=200)
  p.add_argument("--seeds", type=int, default=2)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  if a.dataset == "synthetic":
    src = os.path.join(a.data_dir, "synthetic_source")
    synthetic.write_dataset(src, a.prompts, a.seeds, a.size, a.seed)
    builder = build(src, a.data_dir, "folder", os.path.join(src, "expressive.json"))
    print(f"tokenizer: {os.path.join(src, 'tokenizer')}")
  else:
    if not a.manual_dir:
      p.error("ipr2pr needs --manual_dir")
    builder = build(a.manual_dir, a.data_dir, a.source, a.expressive)
  print(f"dataset: {builder.data_dir}")
  print(json.dumps({"splits": {k: v.num_examples for k, v in builder.info.splits.items()},
                    **dict(builder.info.metadata)}, indent=1))


if __name__ == "__main__":
  main()
