"""A synthetic edit dataset: coloured shapes on a background, edited as an instruction says.

It is the project's embedded data: no download, any resolution, deterministic from a seed.
Each prompt folder holds one scene and one edit, rendered for several seeds with small jitter,
written in the IPr2Pr folder layout so the same TFDS builder reads it, plus `expressive.json`
(MGIE's format), `subsets.json` and a SentencePiece tokenizer trained on the dataset's text.

Two kinds of edits:
  plain     the instruction names what to change: "make the square blue", "remove the circle",
            "add a red triangle", "move the circle to the top left", "make the background green"
  grounded  the instruction only makes sense with the image: "make the largest shape blue",
            "remove the shape left of the circle", "paint the background the colour of the square",
            "make the circle the colour of the triangle". Their expressive instructions state what
            the image shows ("the large red square in the center becomes blue").
The last 10% of prompt folders (validation and test, by IPr2Pr's contiguous split) may also draw
held-out combinations (an edit kind with a colour or shape never paired with it in training).

  python -m data_pipelines.synthetic --out /tmp/synthetic --prompts 200 --seeds 2 --size 256
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os

import numpy as np
import sentencepiece as spm
from PIL import Image, ImageDraw

from mgie_jax.text.template import QUESTION, SYSTEM

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
PLAIN = ("recolor", "remove", "add", "move", "background")
GROUNDED = ("recolor_largest", "remove_left_of", "background_like", "recolor_like")
EDITS = PLAIN + GROUNDED
RADIUS = {"small": 1 / 12, "medium": 1 / 9, "large": 1 / 6.5}     # as a fraction of the image
# (edit kind, attribute) pairs that only validation and test use: unseen in training.
HELDOUT = {("recolor_largest", "cyan"), ("recolor_largest", "orange"), ("remove_left_of", "square"),
           ("background_like", "triangle"), ("recolor_like", "circle")}
TRAIN_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  color: str
  cell: str
  size: str = "medium"

  def where(self) -> str:
    return "in the center" if self.cell == "center" else f"at the {self.cell}"

  def describe(self) -> str:
    size = "" if self.size == "medium" else f"{self.size} "
    return f"the {size}{self.color} {self.kind} {self.where()}"


@dataclasses.dataclass(frozen=True)
class Scene:
  background: str
  shapes: tuple

  def caption(self) -> str:
    parts = [f"a {'' if s.size == 'medium' else s.size + ' '}{s.color} {s.kind} {s.where()}" for s in self.shapes]
    body = " and ".join(parts) if parts else "nothing"
    return f"{body} on a {self.background} background"


@dataclasses.dataclass(frozen=True)
class Edit:
  kind: str
  before: Scene
  after: Scene
  instruction: str      # terse
  expressive: str
  attribute: str = ""   # the colour or shape the edit is about (held-out combinations)

  @property
  def subset(self) -> str:
    return "grounded" if self.kind in GROUNDED else "plain"


def cell_center(cell: str, size: int, jitter=(0.0, 0.0)) -> tuple[float, float]:
  col, row = CELLS[cell]
  step = size / 3
  return (col + 0.5 + jitter[0]) * step, (row + 0.5 + jitter[1]) * step


def render(scene: Scene, size: int, rng: np.random.Generator | None = None) -> Image.Image:
  """Draw a scene; `rng` adds a small per-seed jitter to positions and sizes (the same for
  every shape in a cell, so an edit's before and after differ only where the edit is)."""
  img = Image.new("RGB", (size, size), COLORS[scene.background])
  draw = ImageDraw.Draw(img)
  jitters = {}
  if rng is not None:
    for cell in CELLS:
      jitters[cell] = (tuple(rng.uniform(-0.06, 0.06, 2)), rng.uniform(0.9, 1.1))
  for s in scene.shapes:
    jitter, scale = jitters.get(s.cell, ((0.0, 0.0), 1.0))
    cx, cy = cell_center(s.cell, size, jitter)
    r = size * RADIUS[s.size] * scale
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLORS[s.color]
    if s.kind == "circle":
      draw.ellipse(box, fill=fill)
    elif s.kind == "square":
      draw.rectangle(box, fill=fill)
    else:
      draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
  return img


def _pick(rng, items):
  items = list(items)
  return items[int(rng.integers(0, len(items)))]


def _scene(rng, n_min=1, n_max=3, unique_kinds=False, sizes=("medium",)):
  names = list(COLORS)
  bg = _pick(rng, names)
  n = int(rng.integers(n_min, n_max + 1))
  cells = [str(c) for c in rng.choice(list(CELLS), n + 1, replace=False)]
  kinds = [str(k) for k in rng.choice(SHAPES, n, replace=not unique_kinds)]
  colors = [c for c in names if c != bg]
  shapes = tuple(Shape(kinds[i], _pick(rng, colors), cells[i], _pick(rng, sizes)) for i in range(n))
  return Scene(bg, shapes), cells[n]


def plain_edit(rng) -> Edit:
  before, free = _scene(rng)
  bg, shapes = before.background, before.shapes
  shape_colors = [c for c in COLORS if c != bg]
  kind = _pick(rng, PLAIN)
  target = shapes[int(rng.integers(0, len(shapes)))]
  others = tuple(s for s in shapes if s is not target)
  if kind == "recolor":
    new = _pick(rng, [c for c in shape_colors if c != target.color])
    after = Scene(bg, others + (dataclasses.replace(target, color=new),))
    return Edit(kind, before, after, f"make the {target.kind} {new}",
                f"change {target.describe()} to {new}, keeping everything else the same.", new)
  if kind == "remove":
    return Edit(kind, before, Scene(bg, others), f"remove the {target.kind}",
                f"remove {target.describe()} so that only the {bg} background shows there.", target.kind)
  if kind == "add":
    new = Shape(_pick(rng, SHAPES), _pick(rng, shape_colors), free)
    return Edit(kind, before, Scene(bg, shapes + (new,)), f"add a {new.color} {new.kind}",
                f"add {new.describe().replace('the ', 'a ', 1)} on the {bg} background.", new.kind)
  if kind == "move":
    moved = dataclasses.replace(target, cell=free)
    where = "the center" if moved.cell == "center" else f"the {moved.cell}"
    return Edit(kind, before, Scene(bg, others + (moved,)), f"move the {target.kind} to {where}",
                f"move {target.describe()} to {where}, leaving its old place empty.", target.kind)
  used = {s.color for s in shapes}
  new_bg = _pick(rng, [c for c in COLORS if c != bg and c not in used])
  return Edit(kind, before, Scene(new_bg, shapes), f"make the background {new_bg}",
              f"change the background from {bg} to {new_bg}, keeping the shapes as they are.", new_bg)


def grounded_edit(rng) -> Edit | None:
  """An edit whose terse instruction needs the image; None when the drawn scene does not allow it."""
  kind = _pick(rng, GROUNDED)
  if kind == "recolor_largest":
    before, _ = _scene(rng, 2, 3, sizes=("small", "medium"))
    i = int(rng.integers(0, len(before.shapes)))
    shapes = tuple(dataclasses.replace(s, size="large" if j == i else "small") for j, s in enumerate(before.shapes))
    before = Scene(before.background, shapes)
    target = shapes[i]
    new = _pick(rng, [c for c in COLORS if c not in (before.background, target.color)])
    after = Scene(before.background, tuple(dataclasses.replace(s, color=new) if s is target else s for s in shapes))
    return Edit(kind, before, after, f"make the largest shape {new}",
                f"the large {target.color} {target.kind} {target.where()} becomes {new}; the smaller shapes stay "
                "as they are.", new)
  before, _ = _scene(rng, 2, 3, unique_kinds=True)
  bg, shapes = before.background, before.shapes
  by_kind = {s.kind: s for s in shapes}
  if kind == "remove_left_of":
    pairs = [(t, a) for t in shapes for a in shapes
             if CELLS[t.cell][1] == CELLS[a.cell][1] and CELLS[t.cell][0] < CELLS[a.cell][0]]
    if not pairs:
      return None
    target, anchor = pairs[int(rng.integers(0, len(pairs)))]
    if sum(1 for t, a in pairs if a is anchor) != 1:
      return None
    return Edit(kind, before, Scene(bg, tuple(s for s in shapes if s is not target)),
                f"remove the shape left of the {anchor.kind}",
                f"remove the {target.color} {target.kind} {target.where()}, left of the {anchor.color} "
                f"{anchor.kind}, so that the {bg} background shows there.", target.kind)
  if kind == "background_like":
    ref = by_kind[_pick(rng, sorted(by_kind))]
    if ref.color == bg:
      return None
    return Edit(kind, before, Scene(ref.color, shapes), f"paint the background the colour of the {ref.kind}",
                f"the {bg} background turns {ref.color}, the colour of the {ref.kind} {ref.where()}.", ref.kind)
  target, ref = (by_kind[k] for k in rng.choice(sorted(by_kind), 2, replace=False))
  if target.color == ref.color:
    return None
  after = Scene(bg, tuple(dataclasses.replace(s, color=ref.color) if s is target else s for s in shapes))
  return Edit(kind, before, after, f"make the {target.kind} the colour of the {ref.kind}",
              f"the {target.color} {target.kind} {target.where()} becomes {ref.color}, like the {ref.kind} "
              f"{ref.where()}.", target.kind)


def random_edit(seed: int, grounded: float = 0.0, heldout: str = "exclude", kinds=None) -> Edit:
  """An edit chosen from `seed`: grounded with probability `grounded`. `heldout` is "exclude"
  (never a held-out combination: training), "allow", or "prefer" (one whenever possible).
  `kinds` restricts the edit kinds (e.g. ("background",) for a quick smoke run)."""
  rng = np.random.default_rng(seed)
  want_grounded = rng.random() < grounded
  if kinds:
    want_grounded = bool(set(kinds) & set(GROUNDED)) and (not set(kinds) & set(PLAIN) or want_grounded)
  for _ in range(500):
    edit = grounded_edit(rng) if want_grounded else plain_edit(rng)
    if edit is None or (kinds and edit.kind not in kinds):
      continue
    held = (edit.kind, edit.attribute) in HELDOUT
    if heldout == "exclude" and held:
      continue
    if heldout == "prefer" and not held and rng.random() < 0.9:
      continue
    return edit
  raise RuntimeError(f"no edit found for seed {seed}")


def jpeg(img: Image.Image, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def write_dataset(out: str, prompts: int = 200, seeds: int = 2, size: int = 256, seed: int = 0,
                  tokenizer: bool = True, grounded: float = 0.0, kinds=None) -> dict:
  """Write the IPr2Pr folder layout, expressive.json, subsets.json and (optionally) tokenizer/.

  Folders from floor(0.9 * prompts) on (IPr2Pr's validation and test) may draw held-out
  combinations of grounded edits; training folders never do.
  """
  os.makedirs(out, exist_ok=True)
  index, expressive, subsets, texts = [], {}, {}, []
  first_heldout = math.floor(TRAIN_FRACTION * prompts)
  for p in range(prompts):
    held = p >= first_heldout
    edit = random_edit(seed * 1_000_003 + p, grounded, "allow" if held else "exclude", kinds)
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
      key = f"{folder}_{s}_0"
      expressive[key] = {"instruction": edit.instruction, "expressive": edit.expressive}
      subsets[key] = {"subset": edit.subset, "kind": edit.kind,
                      "heldout": (edit.kind, edit.attribute) in HELDOUT}
    index.append([folder, folder_seeds])
    texts += [edit.instruction, edit.expressive, edit.before.caption(), edit.after.caption()]
  for name, obj in (("seeds.json", index), ("expressive.json", expressive), ("subsets.json", subsets)):
    with open(os.path.join(out, name), "w") as f:
      json.dump(obj, f)
  if tokenizer:
    train_tokenizer(os.path.join(out, "tokenizer"), texts)
  return {"prompts": prompts, "pairs": prompts * seeds, "size": size}


def train_tokenizer(out: str, texts, vocab_size: int = 1000) -> str:
  """A SentencePiece BPE model with LLaMA's conventions (unk 0, bos 1, eos 2, byte fallback).

  Trained on the dataset's text plus MGIE's prompt template, so it loads through the same
  `mgie_jax.text.LlamaTokenizer.from_pretrained` code as a real LLaMA folder.
  """
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
  p.add_argument("--grounded", type=float, default=0.3, help="fraction of grounded edits")
  a = p.parse_args()
  info = write_dataset(a.out, a.prompts, a.seeds, a.size, a.seed, grounded=a.grounded)
  print(f"wrote {info['pairs']} pairs ({info['prompts']} prompts, {a.size}px) and a tokenizer to {a.out}")


if __name__ == "__main__":
  main()
