"""LLaMA tokenizer from a local folder, with the special tokens MGIE adds.

MGIE was trained with transformers' *slow* LLaMA tokenizer, which splits the text
on added tokens, strips the whitespace on both sides of each, and runs
SentencePiece on every remaining piece. transformers 5 has no slow tokenizer, so
we reproduce that behaviour on top of `sentencepiece` directly; ids of a prompt
therefore match what the released checkpoint saw (e.g. `. [IMG0] [IMG1]` gives
contiguous `[IMG]` ids).
"""

from __future__ import annotations

import json
import os
import re

import sentencepiece as spm

IM_PATCH, IM_START, IM_END = "<im_patch>", "<im_start>", "<im_end>"
IMAGE = "<image>"            # LLaVA-1.5's image placeholder (an added token of its llava-hf folders)
IMG_TOKENS = tuple(f"[IMG{i}]" for i in range(8))
LLAVA_V1_TOKENS = (IM_PATCH, IM_START, IM_END)
MGIE_TOKENS = LLAVA_V1_TOKENS + IMG_TOKENS


class LlamaTokenizer:
  """SentencePiece LLaMA tokenizer plus added tokens (ids after the SentencePiece vocabulary)."""

  def __init__(self, model_file: str, added_tokens: dict[str, int] | None = None):
    if not os.path.exists(model_file):
      raise FileNotFoundError(f"SentencePiece model {model_file} does not exist")
    self.sp = spm.SentencePieceProcessor(model_file=model_file)
    self.model_file = model_file
    self.added: dict[str, int] = {}
    for tok, idx in sorted((added_tokens or {}).items(), key=lambda kv: kv[1]):
      self._register(tok, idx)

  # --- vocabulary -------------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, folder: str, extra_tokens=MGIE_TOKENS) -> "LlamaTokenizer":
    """Read `tokenizer.model` and the folder's added tokens, then add any of `extra_tokens` missing."""
    model_file = os.path.join(folder, "tokenizer.model")
    if not os.path.exists(model_file):
      raise FileNotFoundError(
          f"{folder} has no tokenizer.model (the SentencePiece file LLaMA tokenizers ship)")
    added = {}
    path = os.path.join(folder, "added_tokens.json")
    if os.path.exists(path):
      with open(path) as f:
        added.update(json.load(f))
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(path):
      with open(path) as f:
        decoder = json.load(f).get("added_tokens_decoder", {})
      added.update({v["content"]: int(k) for k, v in decoder.items()})
    tok = cls(model_file)
    for t, i in sorted(added.items(), key=lambda kv: kv[1]):
      if i >= tok.sp.get_piece_size():
        tok._register(t, i)
    tok.add_tokens(extra_tokens)
    return tok

  def _register(self, token: str, idx: int):
    if idx < self.sp.get_piece_size():
      raise ValueError(f"added token {token!r} has id {idx}, inside the SentencePiece vocabulary")
    self.added[token] = idx

  def add_tokens(self, tokens) -> int:
    """Append tokens not yet known at the next free ids; returns how many were added."""
    n = 0
    for t in tokens:
      if t not in self.added:
        self.added[t] = len(self)
        n += 1
    return n

  def __len__(self) -> int:
    return max([self.sp.get_piece_size() - 1, *self.added.values()]) + 1

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  def token_to_id(self, token: str) -> int:
    if token in self.added:
      return self.added[token]
    idx = self.sp.piece_to_id(token)
    if idx == self.sp.unk_id() and token != self.sp.id_to_piece(idx):
      raise KeyError(f"token {token!r} is not in the vocabulary")
    return idx

  # --- encoding ---------------------------------------------------------------------------
  def _specials(self) -> dict[str, int]:
    out = dict(self.added)
    for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()):
      if i >= 0:
        out[self.sp.id_to_piece(i)] = i
    return out

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    specials = self._specials()
    pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
    pieces = re.split(pattern, text)
    ids = [self.bos_id] if add_bos else []
    for n, piece in enumerate(pieces):
      if n % 2:       # an added/special token
        ids.append(specials[piece])
        continue
      # The slow tokenizer strips whitespace next to added tokens.
      if n > 0:
        piece = piece.lstrip()
      if n < len(pieces) - 1:
        piece = piece.rstrip()
      if piece:
        ids.extend(self.sp.encode(piece))
    return ids

  def decode(self, ids, skip_special: bool = True) -> str:
    inv = {v: k for k, v in self.added.items()}
    specials = {self.bos_id, self.eos_id, self.sp.pad_id()}
    out, run = [], []
    for i in (int(x) for x in ids):
      if i in inv or i in specials:
        if run:
          out.append(self.sp.decode(run))
          run = []
        if not skip_special and i in inv:
          out.append(inv[i])
        continue
      run.append(i)
    if run:
      out.append(self.sp.decode(run))
    return " ".join(s for s in out if s)
