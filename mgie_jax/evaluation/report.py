"""Sweep reports: `summary.csv` (one row per editor, step, mode and setting; metrics averaged over
examples), `table.md` (the layout papers use: dataset x metric, one row per model/setting, the
copy-the-input row included), and plots: CLIP-I vs CLIP-T over the guidance grid, and each
metric against the checkpoint step."""

from __future__ import annotations

import csv
import io
from collections import defaultdict

import numpy as np
from etils import epath

KEYS = ("editor", "name", "step", "mode", "text_scale", "image_scale", "sampler", "steps", "resolution")


def summarize(rows: list[dict], metric_names) -> list[dict]:
  """Mean (and count, seeds) of each metric per (editor, mode, scales, sampler, steps, resolution);
  seeds are pooled."""
  groups = defaultdict(list)
  for r in rows:
    groups[tuple(r.get(k) for k in KEYS)].append(r)
  out = []
  for key, rs in groups.items():
    row = dict(zip(KEYS, key))
    row["examples"] = len({r["key"] for r in rs})
    row["seeds"] = len({r["seed"] for r in rs})
    for m in metric_names:
      vals = [r[m] for r in rs if m in r]
      row[m] = float(np.mean(vals)) if vals else None
      if len({r["seed"] for r in rs}) > 1 and vals:
        per_seed = defaultdict(list)
        for r in rs:
          if m in r:
            per_seed[r["seed"]].append(r[m])
        row[f"{m}_std_over_seeds"] = float(np.std([np.mean(v) for v in per_seed.values()]))
    out.append(row)
  copy_first = lambda r: (r["name"] != "copy-input", str(r["name"]), r["step"] or 0, r["mode"],
                          r["text_scale"], r["image_scale"])
  return sorted(out, key=copy_first)


def write_csv(summary: list[dict], path) -> None:
  fields = list(dict.fromkeys(k for r in summary for k in r))
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=fields)
  w.writeheader()
  for r in summary:
    w.writerow(r)
  epath.Path(path).write_text(buf.getvalue())


def markdown(summary: list[dict], metric_names, dataset: str, lower_is_better=()) -> str:
  head = ["model", "mode", "text / image scale"] + [f"{m} {'↓' if m in lower_is_better else '↑'}"
                                                     for m in metric_names]
  lines = [f"### {dataset}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in summary:
    model = r["editor"]
    scales = "—" if r["name"] == "copy-input" else f"{r['text_scale']:g} / {r['image_scale']:g}"
    cells = [f"{r[m]:.4f}" if r.get(m) is not None else "—" for m in metric_names]
    lines.append("| " + " | ".join([model, r["mode"], scales] + cells) + " |")
  lines.append("")
  lines.append(f"{max((r['examples'] for r in summary), default=0)} examples; copy-input edits nothing (the "
               "input is the output) and beats every model on some of these metrics.")
  return "\n".join(lines) + "\n"


def plot_tradeoff(summary, x: str, y: str, path) -> bool:
  """`y` against `x` over the guidance grid: one curve per model and image scale."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pts = [r for r in summary if r.get(x) is not None and r.get(y) is not None]
  if not pts:
    return False
  fig, ax = plt.subplots(figsize=(6, 4.5))
  curves = defaultdict(list)
  for r in pts:
    label = r["editor"] if r["name"] == "copy-input" else f"{r['editor']} ({r['mode']}, image {r['image_scale']:g})"
    curves[label].append(r)
  for label, rs in sorted(curves.items()):
    rs = sorted(rs, key=lambda r: r["text_scale"])
    marker = "*" if rs[0]["name"] == "copy-input" else "o"
    ax.plot([r[x] for r in rs], [r[y] for r in rs], marker=marker, label=label, markersize=9 if marker == "*" else 5)
    if rs[0]["name"] != "copy-input":
      for r in rs:
        ax.annotate(f"{r['text_scale']:g}", (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  ax.set_title(f"{y} vs {x} over the guidance grid (labels: text scale)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)
  return True


def plot_steps(summary, metric: str, path) -> bool:
  """`metric` against the checkpoint step: one curve per run and setting."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  curves = defaultdict(list)
  for r in summary:
    if r["step"] is not None and r.get(metric) is not None:
      curves[(r["name"], r["mode"], r["text_scale"], r["image_scale"])].append(r)
  copy = [r for r in summary if r["name"] == "copy-input" and r.get(metric) is not None]
  if not any(len(v) > 1 for v in curves.values()):
    return False
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for (name, mode, ts, im), rs in sorted(curves.items()):
    rs = sorted(rs, key=lambda r: r["step"])
    ax.plot([r["step"] for r in rs], [r[metric] for r in rs], marker="o", label=f"{name} ({mode}, {ts:g}/{im:g})")
  for r in copy:
    ax.axhline(r[metric], linestyle="--", color="gray", label=f"copy-input ({r['mode']})")
  ax.set_xlabel("checkpoint step")
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} vs checkpoint step")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)
  return True


def plot_clip_s(summary, path) -> bool:
  """The paper's CLIP-S plot: the expressive instructions' CLIP-S against the input and the goal
  image, one pair of bars per editor that writes them (and setting)."""
  rows = [r for r in summary if r.get("clip_s_input") is not None or r.get("clip_s_goal") is not None]
  if not rows:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.4))
  x = np.arange(len(rows))
  for k, (m, label) in enumerate((("clip_s_input", "input image"), ("clip_s_goal", "goal image"))):
    vals = [r.get(m) if r.get(m) is not None else np.nan for r in rows]
    ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=label)
  names = [f"{r['name']}" + (f"@{r['step']}" if r["step"] is not None else "") + f"\n{r['mode']}" for r in rows]
  ax.set_xticks(x, names, fontsize=7)
  ax.set_ylabel("CLIP-S (cosine)")
  ax.set_title("CLIP-S of the expressive instructions")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  _save(fig, path)
  return True


def _save(fig, path):
  import matplotlib.pyplot as plt
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  epath.Path(path).write_bytes(buf.getvalue())
