"""T5 / Flan-T5 tokenizer from a folder's SentencePiece model (`spiece.model`).

Encoding is SentencePiece plus `</s>`; ids past the SentencePiece vocabulary are T5's
`<extra_id_N>` sentinels (counted down from the end). Decoding skips special tokens, as
transformers' `decode(..., skip_special_tokens=True)` does for summaries.
"""

from __future__ import annotations

import json
import os

import sentencepiece as spm


class T5Tokenizer:

  def __init__(self, model_file: str, model_max_length: int = 512):
    if not os.path.exists(model_file):
      raise FileNotFoundError(f"SentencePiece model {model_file} does not exist")
    self.sp = spm.SentencePieceProcessor(model_file=model_file)
    self.model_max_length = model_max_length
    self.pad_id, self.eos_id, self.unk_id = self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()
    if self.eos_id < 0:
      raise ValueError(f"{model_file} has no </s> piece; it is not a T5 SentencePiece model")

  @classmethod
  def from_pretrained(cls, folder: str) -> "T5Tokenizer":
    model_file = os.path.join(folder, "spiece.model")
    if not os.path.exists(model_file):
      raise FileNotFoundError(f"{folder} has no spiece.model (the SentencePiece file T5 tokenizers ship)")
    max_len = 512
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(path):
      with open(path) as f:
        value = json.load(f).get("model_max_length")
      # Hub configs often say 1e30 ("no limit"); T5's relative positions have none, 512 is its training length.
      if isinstance(value, int) and value < 100_000:
        max_len = value
    return cls(model_file, max_len)

  def encode(self, text: str, *, truncation: bool = True) -> list[int]:
    ids = self.sp.encode(text)
    if truncation and len(ids) + 1 > self.model_max_length:
      ids = ids[:self.model_max_length - 1]
    return ids + [self.eos_id]

  def decode(self, ids) -> str:
    special = {self.pad_id, self.eos_id, self.unk_id}
    size = self.sp.get_piece_size()
    return self.sp.decode([int(i) for i in ids if int(i) not in special and 0 <= int(i) < size])
