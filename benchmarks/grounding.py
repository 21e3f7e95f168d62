"""MGIE's point on the synthetic data: visual grounding against a text-only editor.

  python benchmarks/grounding.py --out /tmp/grounding [--seeds 0,1,2]

For each seed, trains the README's tiny MGIE (configs/tiny.py) and the text-only InstructPix2Pix
baseline (configs/tiny_ip2p.py) with the same command, data and budget (the baseline reuses the
MGIE run's generated data and VAE), then evaluates both with `python -m mgie_jax.evaluate
--config=configs/eval/synthetic.py` on the held-out splits, overall and on the grounded subset,
with the copy-the-input row. `--reference` adds MGIE conditioned on the reference expressive
instructions (`--config.expressive=reference`): what its edit head and UNet do given the right
text. Prints per-seed tables, then mean and spread over seeds, and the wall time of every command.
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("l1", "edit_acc", "keep_acc", "exp_token_acc", "exp_exact")


def run(cmd, log):
  t0 = time.time()
  with open(log, "w") as f:
    subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
  return time.time() - t0


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--extra", default="", help="extra --config.* flags for both trainings (space-separated)")
  p.add_argument("--reference", action="store_true", help="also MGIE with the reference expressive instructions")
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  py = sys.executable
  results, times = {}, {}
  for seed in (int(s) for s in a.seeds.split(",")):
    mgie, ip2p = os.path.join(a.out, f"mgie_s{seed}"), os.path.join(a.out, f"ip2p_s{seed}")
    extra = [f"--config.seed={seed}"] + a.extra.split()
    if not os.path.exists(os.path.join(mgie, "eval.jsonl")):
      times[f"mgie_s{seed}"] = run([py, "-m", "mgie_jax.train", "--config=configs/tiny.py", f"--workdir={mgie}", *extra],
                                   os.path.join(a.out, f"train_mgie_s{seed}.log"))
    if not os.path.exists(os.path.join(ip2p, "eval.jsonl")):
      if not os.path.exists(os.path.join(ip2p, "data")):
        shutil.copytree(os.path.join(mgie, "data"), os.path.join(ip2p, "data"))
      times[f"ip2p_s{seed}"] = run([py, "-m", "mgie_jax.train", "--config=configs/tiny_ip2p.py", f"--workdir={ip2p}",
                                    *extra], os.path.join(a.out, f"train_ip2p_s{seed}.log"))
    data = os.path.join(mgie, "data", "tfds", "ipr2pr", "folder", "1.0.0")
    subsets = os.path.join(mgie, "data", "synthetic_source", "subsets.json")
    for subset in ("", "grounded"):
      out = os.path.join(a.out, f"eval_s{seed}_{subset or 'all'}")
      cmd = lambda runs, *more: [py, "-m", "mgie_jax.evaluate", "--config=configs/eval/synthetic.py", f"--workdir={out}",
                                 f"--config.dataset.dir={data}", f"--config.runs={runs}", f"--config.seeds={seed}",
                                 f"--config.dataset.subset={subset}",
                                 f"--config.dataset.subset_file={subsets if subset else ''}", *more]
      name = f"eval_s{seed}_{subset or 'all'}"
      times[name] = run(cmd(f"{mgie},{ip2p}"), os.path.join(a.out, f"{name}.log"))
      if a.reference:    # the same workdir: the rows already scored are kept, MGIE's reference rows added
        times[f"{name}_reference"] = run(cmd(mgie, "--config.expressive=reference"),
                                         os.path.join(a.out, f"{name}_reference.log"))
      with open(os.path.join(out, "summary.csv")) as f:
        for row in csv.DictReader(f):
          editor = row["name"]
          model = ("copy-input" if editor == "copy-input" else "MGIE, reference text" if editor.endswith("+reference")
                   else "MGIE" if editor.startswith("mgie") else "text-only IP2P")
          results.setdefault((model, subset or "all"), []).append(
              {m: float(row[m]) for m in METRICS if row.get(m) not in (None, "")} | {"examples": int(row["examples"])})
  lines = ["| model | subset | examples | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
  for (model, subset), rows in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    cells = []
    for m in METRICS:
      vals = [r[m] for r in rows if m in r]
      cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if vals else "—")
    lines.append(f"| {model} | {subset} | {rows[0]['examples']} | " + " | ".join(cells) + " |")
  report = "\n".join(lines) + f"\n\n{len(a.seeds.split(','))} seeds ({a.seeds}); mean ± std over seeds.\n"
  report += "wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + "\n"
  print(report)
  with open(os.path.join(a.out, "report.md"), "w") as f:
    f.write(report)
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump({f"{k[0]}|{k[1]}": v for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
  main()
