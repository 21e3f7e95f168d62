"""An evaluation sweep: editors x guidance/sampler/seed settings x examples -> one result row
per (editor, setting, example), appended to a per-process JSONL file as soon as it is scored.

  * The conditioning part of an edit (MGIE's expressive instruction and edit-head condition)
    depends only on (editor, example): computed once per batch, reused over the whole grid.
  * Noise comes from the setting's seed folded with a hash of the example's key, so a row does
    not depend on batch size, host count, order or resumption.
  * A killed sweep re-run skips the rows it has; the final numbers equal an uninterrupted run's.
  * Hosts take disjoint sessions (round robin over the sorted sessions); each writes its own file.
  * MagicBrush multi-turn (`mode="multi"`): each turn edits the editor's own previous output;
    the final turn is scored. Single-turn (`mode="single"`): every turn from its ground-truth input.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import zlib
from collections import defaultdict

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from mgie_jax.core.images import decode_rgb

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Setting:
  text_scale: float
  image_scale: float
  seed: int
  sampler: str = "euler_ancestral"
  steps: int = 100
  resolution: int = 512

  @property
  def id(self) -> str:
    return (f"t{self.text_scale:g}_i{self.image_scale:g}_s{self.seed}_{self.sampler}{self.steps}"
            f"_r{self.resolution}")


COPY = Setting(0.0, 0.0, 0, "copy", 0, 0)     # the copy-the-input row's one setting


@dataclasses.dataclass
class Example:
  key: str
  session: str
  turn: int
  input_image: bytes
  target_image: bytes
  instruction: str
  caption: str
  expressive: str = ""         # the reference expressive instruction, where the dataset has one


def load_examples(data_dir: str, split: str, limit: int = 0) -> list[Example]:
  """A built evaluation set's split, ordered by session and turn (ipr2pr datasets read too)."""
  source = tfds.builder_from_directory(data_dir).as_data_source(split)
  out = []
  for i in range(len(source)):
    r = source[i]
    get = lambda k, d=b"": r[k] if k in r else d
    text = lambda k: (get(k).decode() if isinstance(get(k), bytes) else str(get(k)))
    out.append(Example(text("key"), text("session") or text("key"), int(get("turn", 0)), get("input_image"),
                       get("target_image") if "target_image" in r else get("edited_image"),
                       text("instruction"), text("caption"), text("expressive")))
  out.sort(key=lambda e: (_natural(e.session), e.turn, e.key))
  if limit:
    sessions = list(dict.fromkeys(e.session for e in out))[:limit]
    keep = set(sessions)
    out = [e for e in out if e.session in keep]
  return out


def _natural(s: str):
  return (0, int(s), "") if s.isdigit() else (1, 0, s)


def example_randomness(setting: Setting, key: str, latent_shape, needs_noise: bool):
  """(latents, noise) of one example: the setting's seed folded with the key's CRC32."""
  k = jax.random.fold_in(jax.random.key(setting.seed), zlib.crc32(key.encode()) & 0x7FFFFFFF)
  k_lat, k_noise = jax.random.split(k)
  latents = np.asarray(jax.random.normal(k_lat, latent_shape))
  noise = np.asarray(jax.random.normal(k_noise, (setting.steps,) + tuple(latent_shape))) if needs_noise else None
  return latents, noise


class Results:
  """Append-only result rows: `results.p<process>.jsonl` under `directory`, one line per row."""

  def __init__(self, directory, process: int = 0):
    self.directory = epath.Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    self.path = self.directory / f"results.p{process}.jsonl"
    self.done = {self.row_id(r) for r in self.read(self.directory)}

  @staticmethod
  def row_id(row) -> tuple:
    return (row["editor"], row["mode"], row["setting"], row["key"])

  @staticmethod
  def read(directory) -> list[dict]:
    rows = []
    for path in sorted(epath.Path(directory).glob("results.p*.jsonl")):
      for line in path.read_text().splitlines():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:       # a line cut by a kill: that row is redone
          continue
    return rows

  def has(self, editor: str, mode: str, setting: Setting, key: str) -> bool:
    return (editor, mode, setting.id, key) in self.done

  def add(self, rows: list[dict]) -> None:
    if not rows:
      return
    with self.path.open("a") as f:
      f.write("".join(json.dumps(r) + "\n" for r in rows))
      f.flush()
    self.done.update(self.row_id(r) for r in rows)


class MemoryResults(Results):
  """Results kept in memory (validation during training)."""

  def __init__(self):
    self.rows, self.done = [], set()

  def add(self, rows):
    self.rows += rows
    self.done.update(self.row_id(r) for r in rows)


def score(metrics, gens: list, targets: list, examples: list, texts: list | None = None) -> list[dict]:
  """Every metric of every (generated, target) pair, batched where shapes agree; the expressive
  instructions' metrics (CLIP-S) only where `texts` holds one."""
  out = [dict() for _ in gens]
  texts = texts or [None] * len(gens)
  inputs = ([decode_rgb(e.input_image) for e in examples] if any(m.needs_input for m in metrics)
            else [None] * len(examples))
  for m in metrics:
    rows = [n for n, text in enumerate(texts) if text or not m.needs_expressive]
    prepared = {n: m.prepare(gens[n], targets[n], {"caption": examples[n].caption, "input": inputs[n],
                                                   "expressive": texts[n]}) for n in rows}
    groups = defaultdict(list)
    for i, p in prepared.items():
      groups[tuple((k, v.shape) for k, v in sorted(p.items()))].append(i)
    for idx in groups.values():
      batch = {k: np.stack([prepared[i][k] for i in idx]) for k in prepared[idx[0]]}
      for i, v in zip(idx, m.score(batch)):
        out[i][m.name] = float(v)
  return out


@dataclasses.dataclass
class Sweep:
  editors: list
  settings: list
  metrics: list
  results: Results
  batch_size: int = 8
  mode: str = "single"
  images_dir: epath.Path | None = None
  process: int = 0
  processes: int = 1

  def units(self, examples, settings_per_editor: list[int]) -> int:
    """Edits to make (done or not) for editors with these numbers of settings."""
    n = len(examples) if self.mode == "single" else len({e.session for e in examples})
    return n * sum(settings_per_editor)

  def run(self, examples: list[Example], progress=None):
    mine = self._mine(examples)
    for editor in self.editors:
      settings = [COPY] if _is_copy(editor) else self.settings
      if self.mode == "single":
        self._single(editor, settings, mine, progress)
      else:
        self._multi(editor, settings, mine, progress)

  def _mine(self, examples):
    """This process's share: whole sessions, every processes-th one in the (sorted) order all
    hosts load them in."""
    order = {s: i for i, s in enumerate(dict.fromkeys(e.session for e in examples))}
    return [e for e in examples if order[e.session] % self.processes == self.process]

  # --- single turn ------------------------------------------------------------------------------
  def _single(self, editor, settings, examples, progress):
    name = _editor_id(editor)
    todo = [e for e in examples if any(not self.results.has(name, "single", s, e.key) for s in settings)]
    if progress is not None:
      progress.update(len(examples) * len(settings) - sum(
          1 for e in todo for s in settings if not self.results.has(name, "single", s, e.key)))
    for start in range(0, len(todo), self.batch_size):
      batch = todo[start:start + self.batch_size]
      inputs = [decode_rgb(e.input_image) for e in batch]
      targets = [decode_rgb(e.target_image) for e in batch]
      padded = _pad(inputs, self.batch_size)
      conds = editor.conditions(padded, _pad([e.instruction for e in batch], self.batch_size),
                                _pad([e.expressive for e in batch], self.batch_size))
      texts = editor.text_scores(padded, _pad(batch, self.batch_size), conds.texts)[:len(batch)]
      for s in settings:
        need = [i for i, e in enumerate(batch) if not self.results.has(name, "single", s, e.key)]
        if not need:
          continue
        gens = self._edit(editor, s, padded, conds, _pad([e.key for e in batch], self.batch_size))
        gens = inputs if gens is None else gens[:len(batch)]
        self._record(editor, "single", s, [batch[i] for i in need], [gens[i] for i in need],
                     [targets[i] for i in need], [conds.texts[i] for i in need], extra=[texts[i] for i in need])
        if progress is not None:
          progress.update(len(need))

  # --- multi turn -------------------------------------------------------------------------------
  def _multi(self, editor, settings, examples, progress):
    name = _editor_id(editor)
    sessions = defaultdict(list)
    for e in examples:
      sessions[e.session].append(e)
    for s in settings:
      todo = [turns for turns in sessions.values() if not self.results.has(name, "multi", s, turns[-1].key)]
      if progress is not None:
        progress.update(len(sessions) - len(todo))
      for start in range(0, len(todo), self.batch_size):
        group = todo[start:start + self.batch_size]
        current = [decode_rgb(turns[0].input_image) for turns in group]
        texts = [""] * len(group)
        for t in range(max(len(turns) for turns in group)):
          active = [i for i, turns in enumerate(group) if t < len(turns)]
          exs = [group[i][t] for i in active]
          padded = _pad([current[i] for i in active], self.batch_size)
          conds = editor.conditions(padded, _pad([e.instruction for e in exs], self.batch_size),
                                    _pad([e.expressive for e in exs], self.batch_size))
          gens = self._edit(editor, s, padded, conds, _pad([e.key for e in exs], self.batch_size))
          for j, i in enumerate(active):
            current[i] = current[i] if gens is None else gens[j]
            texts[i] = conds.texts[j]
        finals = [turns[-1] for turns in group]
        self._record(editor, "multi", s, finals, current, [decode_rgb(e.target_image) for e in finals], texts,
                     turns=[len(turns) for turns in group])
        if progress is not None:
          progress.update(len(group))

  # --- shared -----------------------------------------------------------------------------------
  def _edit(self, editor, s: Setting, images, conds, keys):
    """PIL edits of a (padded) batch, or None for the copy-the-input editor."""
    if _is_copy(editor):
      return None
    resolution = s.resolution or editor.default_resolution
    size = resolution // editor.latent_factor
    shape = (size, size, editor.latent_channels)
    pairs = [example_randomness(s, k, shape, s.sampler == "euler_ancestral") for k in keys]
    latents = np.stack([p[0] for p in pairs])
    noise = None if pairs[0][1] is None else np.stack([p[1] for p in pairs], axis=1)
    editor.resolution = resolution
    out = editor.sample(images, conds, latents, noise, text_scale=s.text_scale, image_scale=s.image_scale,
                        sampler=(s.sampler, s.steps))
    return [Image.fromarray(x) for x in out]

  def _record(self, editor, mode, s: Setting, exs, gens, targets, texts, turns=None, extra=None):
    scores = score(self.metrics, gens, targets, exs, texts)
    rows = []
    for n, (e, sc, text) in enumerate(zip(exs, scores, texts)):
      row = {"editor": _editor_id(editor), "name": editor.name, "step": editor.step, "mode": mode,
             "setting": s.id, **dataclasses.asdict(s), "key": e.key, "session": e.session, "turn": e.turn,
             "expressive": text, **sc, **(extra[n] if extra else {})}
      if turns is not None:
        row["turns"] = turns[n]
      rows.append(row)
      if self.images_dir is not None:
        folder = self.images_dir / _editor_id(editor).replace("/", "_") / mode / s.id
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        gens[n].save(buf, "PNG")
        (folder / f"{e.key}.png").write_bytes(buf.getvalue())
    self.results.add(rows)


def _editor_id(editor) -> str:
  return editor.name if editor.step is None else f"{editor.name}@{editor.step}"


def _is_copy(editor) -> bool:
  return editor.name == "copy-input"


def _pad(items: list, n: int) -> list:
  """A batch padded to `n` by repeating its last item (one compiled shape for every batch)."""
  return list(items) + [items[-1]] * (n - len(items))
