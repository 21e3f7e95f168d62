"""Validation during training: edit a split's examples with the current weights (one guidance
setting, the evaluation sweep's code) and compare with copying the input, which an editor that
learned nothing cannot beat on L1. Every host runs the same examples (the model is sharded over
all of them); the numbers are the same everywhere.
"""

from __future__ import annotations

import numpy as np

from mgie_jax.evaluation import editors
from mgie_jax.evaluation import metrics as metrics_lib
from mgie_jax.evaluation import sweep


def validate(model, tok, data_dir: str, c, step: int, mesh, palette: dict | None = None):
  """({metric: mean} for the model and `copy_input_<metric>` for the do-nothing row, one dict per
  example: instruction, the written expressive instruction, the model's and copying's scores)."""
  e = c.eval
  examples = sweep.load_examples(data_dir, e.split, e.examples)
  names = ["l1"] + (list(metrics_lib.PALETTE) if palette else [])
  metrics = metrics_lib.make_metrics(names, palette=palette)
  editor = editors.MGIEEditor("run", model, tok, step=step, resolution=c.data.resolution,
                              max_new_tokens=e.max_new_tokens, mesh=mesh)
  setting = sweep.Setting(e.text_scale, e.image_scale, c.seed, e.get("sampler", "euler_ancestral"), e.sample_steps,
                          c.data.resolution)
  results = sweep.MemoryResults()
  sweep.Sweep([editor, editors.CopyInput()], [setting], metrics, results, e.batch_size).run(examples)
  copy = {r["key"]: r for r in results.rows if r["name"] == "copy-input"}
  instruction = {ex.key: ex.instruction for ex in examples}
  scores = names + ["exp_exact", "exp_token_acc"]
  per_example = [{"key": r["key"], "instruction": instruction[r["key"]], "expressive": r["expressive"],
                  **{m: r[m] for m in scores if m in r},
                  **{"copy_input_" + m: copy[r["key"]][m] for m in names if m in copy.get(r["key"], {})}}
                 for r in results.rows if r["name"] == "run"]
  out = {"examples": len(examples)}
  for m in scores + ["copy_input_" + m for m in names]:
    vals = [r[m] for r in per_example if m in r]
    if vals:
      out[m] = float(np.mean(vals))
  return out, per_example


def summary_line(split: str, step: int, v: dict) -> str:
  verdict = "beat" if v["l1"] < v["copy_input_l1"] else "do not beat"
  line = (f"validation ({split}, {v['examples']} examples, step {step}): L1 {v['l1']:.4f} vs copy-input "
          f"{v['copy_input_l1']:.4f}: the edits {verdict} copying the input")
  for m in ("edit_acc", "keep_acc", "exp_token_acc", "exp_exact"):
    if m in v:
      line += f"; {m} {v[m]:.3f}"
  return line
