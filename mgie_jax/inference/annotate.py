"""MGIE's expressive-instruction annotation (the official `process_data.ipynb`), model side.

1. LLaVA (v1, Vicuna v1.1 template) answers "what will this image be like if '<edit>'  (in a short
   paragraph)" about the input image, greedily, up to 1,024 new tokens.
2. The answer is cleaned up as the notebook does: cut at `</s>`, at the first "alternative" (any
   case) and at `[IMG0]`; keep the first two '.'-separated pieces (re-joined by '.' without spaces,
   as the notebook's code does); end with '.'.
3. A Flan-T5 summariser turns "summarize the following paragraph in 32 words:\\n\\n<clean text>"
   into the expressive instruction (beam search with the notebook's settings on top of the
   summariser's own config).

Decoding stops as soon as the kept text is decided (an end token, "alternative", `[IMG0]`, or two
full stops): decoding further cannot change the cleaned text, so the result equals a full-length
decode's at a fraction of the cost.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from mgie_jax.inference.beam import generate
from mgie_jax.inference.greedy import greedy_chunks
from mgie_jax.text.template import SYSTEM, check_image_tokens, image_placeholder, pad_batch

QUESTION = "what will this image be like if '{instruction}'  (in a short paragraph)"   # two spaces, sic
SUMMARY_PROMPT = "summarize the following paragraph in 32 words:\n\n{text}"
MAX_NEW_TOKENS = 1024


def prompt_text(instruction: str, num_image_tokens: int = 256) -> str:
  question = QUESTION.format(instruction=instruction) + "\n" + image_placeholder(num_image_tokens)
  return f"{SYSTEM} USER: {question} ASSISTANT:"


def decided(answer: str, ended: bool) -> bool:
  """Whether more tokens could still change `clean(answer)`."""
  return ended or "alternative" in answer.lower() or "[IMG0]" in answer or answer.count(".") >= 2


def clean(answer: str) -> str | None:
  """The notebook's clean-up of a LLaVA answer (text after "ASSISTANT:", without `</s>`);
  None for an answer with nothing left (the notebook would fail on it)."""
  s = answer.strip()
  if "alternative" in s.lower():
    s = s[:s.lower().index("alternative")]
  if "[IMG0]" in s:
    s = s[:s.index("[IMG0]")]
  s = ".".join(piece.strip() for piece in s.split(".")[:2])
  if not s:
    return None
  if s[-1] != ".":
    s += "."
  return s.strip()


def _bucket(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def llava_answers(llava, tok, clip_images, instructions, *, max_new_tokens: int = MAX_NEW_TOKENS,
                  chunk: int = 32, early_stop: bool = True, pad_multiple: int = 32) -> tuple[list[str], int]:
  """Raw answers (decoded text before clean-up, cut at `</s>`) and the number of tokens decoded
  per row. `early_stop=False` decodes to the end (every row at `</s>` or max_new_tokens).
  Prompts are left-padded to a multiple of `pad_multiple`: few shapes, few compilations."""
  cfg = llava.config
  prompts = [tok.encode(prompt_text(i, cfg.num_image_tokens)) for i in instructions]
  ids, mask = pad_batch(prompts, _bucket(max(map(len, prompts)), pad_multiple), pad_id=0, side="left")
  check_image_tokens(ids, cfg.image_token_id, cfg.num_image_tokens)
  texts, n = [""] * len(prompts), 0
  for new, done in greedy_chunks(llava, ids, mask, pixel_values=np.asarray(clip_images),
                                 max_new_tokens=max_new_tokens, chunk=chunk, eos_id=tok.eos_id):
    n = new.shape[1]
    texts = [tok.decode(_until_eos(row, tok.eos_id)) for row in new]
    if early_stop and all(decided(t, bool(d)) for t, d in zip(texts, done)):
      break
  return texts, n


def _until_eos(row, eos_id: int) -> list[int]:
  row = row.tolist()
  return row[:row.index(eos_id)] if eos_id in row else row


@dataclasses.dataclass(frozen=True)
class SummarizerSettings:
  """Generation settings: the summariser config's summarisation defaults under the notebook's
  explicit ones (num_beams=5, min_length=5, max_length=64, no_repeat_ngram_size=3)."""
  prefix: str = ""
  num_beams: int = 5
  min_length: int = 5
  max_length: int = 64
  no_repeat_ngram_size: int = 3
  length_penalty: float = 1.0
  early_stopping: bool | str = False

  @classmethod
  def from_folder(cls, folder: str) -> "SummarizerSettings":
    """transformers' summarisation pipeline: config.json's `task_specific_params.summarization`
    (and `prefix`) over generation_config.json over the defaults; then the notebook's call values."""
    merged: dict = {}
    for name in ("generation_config.json", "config.json"):
      path = os.path.join(folder, name)
      if os.path.exists(path):
        with open(path) as f:
          hf = json.load(f)
        merged.update({k: hf[k] for k in ("length_penalty", "early_stopping", "prefix") if hf.get(k) is not None})
        if name == "config.json":
          merged.update((hf.get("task_specific_params") or {}).get("summarization") or {})
    known = {f.name for f in dataclasses.fields(cls)}
    notebook = dict(num_beams=5, min_length=5, max_length=64, no_repeat_ngram_size=3)
    return cls(**{**{k: v for k, v in merged.items() if k in known}, **notebook})


def summaries(t5, t5_tok, texts, settings: SummarizerSettings, pad_multiple: int = 32) -> list[str]:
  prompts = [settings.prefix + SUMMARY_PROMPT.format(text=t) for t in texts]
  rows = [t5_tok.encode(p) for p in prompts]
  ids, mask = pad_batch(rows, _bucket(max(map(len, rows)), pad_multiple), pad_id=t5_tok.pad_id, side="right")
  out = generate(t5, ids, mask, num_beams=settings.num_beams, max_length=settings.max_length,
                 min_length=settings.min_length, length_penalty=settings.length_penalty,
                 early_stopping=settings.early_stopping, no_repeat_ngram_size=settings.no_repeat_ngram_size)
  return [t5_tok.decode(row) for row in np.asarray(out.sequences)]
