"""Does a trained tiny MGIE's edit condition carry the colour a background edit asks for?

  python benchmarks/condition_probe.py --workdir /tmp/mgie_tiny [--split train]

Takes the split's "make the background <colour>" examples, runs the MLLM teacher-forced on the
reference expressive instruction (as training does), and scores leave-one-out nearest-centroid
classification of the target colour from (a) the [IMG] window's hidden states and (b) the edit
head's condition. Chance is the commonest colour's share. The text-only baseline's condition
(its text encoder sees the colour word) scores 1.0; an MGIE run whose [IMG] states do not carry
the colour cannot recolour backgrounds, which dominate the synthetic split's L1.
"""

from __future__ import annotations

import argparse
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgie_jax.inference import pipeline as inference
from mgie_jax.run import workdir as workdir_lib
from mgie_jax.evaluation import sweep
from mgie_jax.core.images import clip_view, decode_rgb, mgie_square
from mgie_jax.text import training_example
from mgie_jax.models.mgie import gather_img_window
from mgie_jax.text.template import img_window_start, pad_batch

BACKGROUND = re.compile(r"make the background (\w+)$")


@nnx.jit
def _features(model, ids, mask, clip):
  out = model.mllm(ids, clip, attention_mask=mask)
  window = gather_img_window(out.hidden_states, jnp.maximum(img_window_start(ids, model.config.img_token_id), 0))
  cond, _ = model.conditions(out.hidden_states, ids)
  return window, cond


def nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
  hits = 0
  for i in range(len(labels)):
    rest = np.arange(len(labels)) != i
    centroids = {c: features[rest & (labels == c)].mean(0) for c in set(labels[rest])}
    hits += min(centroids, key=lambda c: np.sum((features[i] - centroids[c]) ** 2)) == labels[i]
  return hits / len(labels)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a finished configs/tiny.py run")
  p.add_argument("--split", default="train")
  p.add_argument("--batch", type=int, default=16)
  a = p.parse_args()
  workdir, step = workdir_lib.locate(a.workdir)
  run = workdir_lib.load(workdir, step)
  model = run.model
  data_dir = run.config.data.dir or os.path.join(str(workdir), "data", "tfds", "ipr2pr", "folder", "1.0.0")
  examples = [e for e in sweep.load_examples(data_dir, a.split) if BACKGROUND.match(e.instruction)]
  if len(examples) < 4:
    raise SystemExit(f"only {len(examples)} background edits in {a.split}: nothing to probe")
  size = model.config.clip_size
  n_img = model.config.llava.num_image_tokens if hasattr(model, "mllm") else 0
  windows, conds = [], []
  with jax.set_mesh(run.mesh):
    for start in range(0, len(examples), a.batch):
      batch = examples[start:start + a.batch]
      if not hasattr(model, "mllm"):     # the text-only baseline: its condition only
        _, c, _ = inference.conditions(model, run.tok, None, [e.instruction for e in batch])
        conds.append(np.asarray(c).reshape(len(batch), -1))
        continue
      rows = [training_example(run.tok, e.instruction, e.expressive, num_image_tokens=n_img, max_length=10 ** 6)
              for e in batch]
      ids, mask = pad_batch([r.input_ids for r in rows], max(len(r.input_ids) for r in rows), pad_id=0)
      clip = np.stack([clip_view(mgie_square(decode_rgb(e.input_image)), size) for e in batch])
      w, c = _features(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(clip))
      windows.append(np.asarray(w).reshape(len(batch), -1))
      conds.append(np.asarray(c).reshape(len(batch), -1))
  labels = np.array([BACKGROUND.match(e.instruction).group(1) for e in examples])
  chance = max(np.mean(labels == c) for c in set(labels))
  print(f"{a.workdir} step {step}, {a.split}: {len(labels)} background edits, {len(set(labels))} colours, "
        f"chance {chance:.3f}")
  if windows:
    print(f"target colour from the [IMG] states: {nearest_centroid_accuracy(np.concatenate(windows), labels):.3f}")
  print(f"target colour from the edit condition: {nearest_centroid_accuracy(np.concatenate(conds), labels):.3f}")


if __name__ == "__main__":
  main()
