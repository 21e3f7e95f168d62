"""A synthetic edit dataset: coloured shapes on a background, edited as an instruction says.

It is the project's embedded data: no download, any resolution, deterministic from a seed.
Each prompt folder holds one scene and one edit (recolour, remove, add, move, background),
rendered for several seeds with small jitter, written in the IPr2Pr folder layout so the
same TFDS builder reads it, plus `expressive.json` (MGIE's format) and a SentencePiece
tokenizer trained on the dataset's text.

  python -m data_pipelines.synthetic --out /tmp/synthetic --prompts 200 --seeds 2 --size 256
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 170), "orange": (245, 140, 20), "white": (245, 245, 245),
    "black": (15, 15, 15), "gray": (128, 128, 128), "pink": (245, 150, 190), "cyan": (40, 200, 220),
}
SHAPES = ("circle", "square", "triangle")
CELLS = {  # grid cell -> (column, row) in a 3x3 grid
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0), "left": (0, 1), "center": (1, 1),
    "right": (2, 1), "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
EDITS = ("recolor", "remove", "add", "move", "background")


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  color: str
  cell: str

  def describe(self) -> str:
    where = "in the center" if self.cell == "center" else f"at the {self.cell}"
    return f"the {self.color} {self.kind} {where}"


@dataclasses.dataclass(frozen=True)
class Scene:
  background: str
  shapes: tuple

  def caption(self) -> str:
    parts = [f"a {s.color} {s.kind} " + ("in the center" if s.cell == "center" else f"at the {s.cell}")
             for s in self.shapes]
    body = " and ".join(parts) if parts else "nothing"
    return f"{body} on a {self.background} background"


@dataclasses.dataclass(frozen=True)
class Edit:
  kind: str
  before: Scene
  after: Scene
  instruction: str      # terse
  expressive: str


def cell_center(cell: str, size: int, jitter=(0.0, 0.0)) -> tuple[float, float]:
  col, row = CELLS[cell]
  step = size / 3
  return (col + 0.5 + jitter[0]) * step, (row + 0.5 + jitter[1]) * step


def render(scene: Scene, size: int, rng: np.random.Generator | None = None) -> Image.Image:
  """Draw a scene; `rng` adds a small per-seed jitter to positions and sizes."""
  img = Image.new("RGB", (size, size), COLORS[scene.background])
  draw = ImageDraw.Draw(img)
  for s in scene.shapes:
    jitter = (0.0, 0.0) if rng is None else tuple(rng.uniform(-0.06, 0.06, 2))
    scale = 1.0 if rng is None else rng.uniform(0.9, 1.1)
    cx, cy = cell_center(s.cell, size, jitter)
    r = size / 9 * scale
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLORS[s.color]
    if s.kind == "circle":
      draw.ellipse(box, fill=fill)
    elif s.kind == "square":
      draw.rectangle(box, fill=fill)
    else:
      draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
  return img


def random_edit(seed: int) -> Edit:
  """A scene of 1-3 shapes and one edit, all chosen from `seed`."""
  rng = np.random.default_rng(seed)
  names = list(COLORS)
  bg = str(rng.choice(names))
  n = int(rng.integers(1, 4))
  cells = [str(c) for c in rng.choice(list(CELLS), n + 1, replace=False)]
  shape_colors = [c for c in names if c != bg]
  shapes = tuple(Shape(str(rng.choice(SHAPES)), str(rng.choice(shape_colors)), cells[i]) for i in range(n))
  before = Scene(bg, shapes)
  kind = str(rng.choice(EDITS))
  target = shapes[int(rng.integers(0, n))]
  others = tuple(s for s in shapes if s is not target)
  if kind == "recolor":
    new = str(rng.choice([c for c in shape_colors if c != target.color]))
    after = Scene(bg, others + (dataclasses.replace(target, color=new),))
    return Edit(kind, before, after, f"make the {target.kind} {new}",
                f"change {target.describe()} to {new}, keeping everything else the same.")
  if kind == "remove":
    after = Scene(bg, others)
    return Edit(kind, before, after, f"remove the {target.kind}",
                f"remove {target.describe()} so that only the {bg} background shows there.")
  if kind == "add":
    new = Shape(str(rng.choice(SHAPES)), str(rng.choice(shape_colors)), cells[n])
    after = Scene(bg, shapes + (new,))
    return Edit(kind, before, after, f"add a {new.color} {new.kind}",
                f"add {new.describe().replace('the ', 'a ', 1)} on the {bg} background.")
  if kind == "move":
    moved = dataclasses.replace(target, cell=cells[n])
    after = Scene(bg, others + (moved,))
    where = "the center" if moved.cell == "center" else f"the {moved.cell}"
    return Edit(kind, before, after, f"move the {target.kind} to {where}",
                f"move {target.describe()} to {where}, leaving its old place empty.")
  used = {s.color for s in shapes}
  new_bg = str(rng.choice([c for c in names if c != bg and c not in used]))
  after = Scene(new_bg, shapes)
  return Edit(kind, before, after, f"make the background {new_bg}",
              f"change the background from {bg} to {new_bg}, keeping the shapes as they are.")


def jpeg(img: Image.Image, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def write_dataset(out: str, prompts: int = 200, seeds: int = 2, size: int = 256, seed: int = 0,
                  tokenizer: bool = True) -> dict:
  """Write the IPr2Pr folder layout, expressive.json and (optionally) tokenizer/ under `out`."""
  os.makedirs(out, exist_ok=True)
  index, expressive, texts = [], {}, []
  for p in range(prompts):
    edit = random_edit(seed * 1_000_003 + p)
    folder = f"{p:07d}"
    os.makedirs(os.path.join(out, folder), exist_ok=True)
    with open(os.path.join(out, folder, "prompt.json"), "w") as f:
      json.dump({"input": edit.before.caption(), "edit": edit.instruction,
                 "output": edit.after.caption()}, f)
    folder_seeds = [int(s) for s in np.random.default_rng([seed, p]).integers(0, 2**31 - 1, seeds)]
    for s in folder_seeds:
      # The same jitter for both images: only the edit differs between input and output.
      for i, scene in enumerate((edit.before, edit.after)):
        with open(os.path.join(out, folder, f"{s}_{i}.jpg"), "wb") as f:
          f.write(jpeg(render(scene, size, np.random.default_rng(s))))
      expressive[f"{folder}_{s}_0"] = {"instruction": edit.instruction, "expressive": edit.expressive}
    index.append([folder, folder_seeds])
    texts += [edit.instruction, edit.expressive, edit.before.caption(), edit.after.caption()]
  with open(os.path.join(out, "seeds.json"), "w") as f:
    json.dump(index, f)
  with open(os.path.join(out, "expressive.json"), "w") as f:
    json.dump(expressive, f)
  if tokenizer:
    train_tokenizer(os.path.join(out, "tokenizer"), texts)
  return {"prompts": prompts, "pairs": prompts * seeds, "size": size}


def train_tokenizer(out: str, texts, vocab_size: int = 1000) -> str:
  """A SentencePiece BPE model with LLaMA's conventions (unk 0, bos 1, eos 2, byte fallback).

  Trained on the dataset's text plus MGIE's prompt template, so it loads through the same
  `mgie_jax.text.LlamaTokenizer.from_pretrained` code as a real LLaMA folder.
  """
  import sentencepiece as spm
  from mgie_jax.text.template import QUESTION, SYSTEM
  os.makedirs(out, exist_ok=True)
  corpus = list(texts) + [SYSTEM, "USER: ASSISTANT:", QUESTION.format(instruction="make it blue")] * 20
  corpus += ["".join(chr(c) for c in range(32, 127))]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_prefix=os.path.join(out, "tokenizer"), vocab_size=vocab_size,
      model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
      character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--prompts", type=int, default=200)
  p.add_argument("--seeds", type=int, default=2, help="image pairs per prompt folder")
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  info = write_dataset(a.out, a.prompts, a.seeds, a.size, a.seed)
  print(f"wrote {info['pairs']} pairs ({info['prompts']} prompts, {a.size}px) and a tokenizer to {a.out}")


if __name__ == "__main__":
  main()
