"""MGIE's prompt: the Vicuna v1.1 chat template, image-token expansion, label mask and `[IMG]` window.

  <s> SYSTEM USER: what will this image be like if '<instruction>'
  <im_start><im_patch>x256<im_end> ASSISTANT: <expressive instruction> [IMG0]...[IMG7]</s>

That is the release's ("llava_v1": LLaVA-7B v1 was trained with the image after the question,
wrapped in <im_start>/<im_end>). On LLaVA-1.5 ("llava_1_5") the same question is asked the way
LLaVA-1.5 was trained to read images, Vicuna v1 with the image first and no wrapping tokens:

  <s> SYSTEM USER: <image>x576
  what will this image be like if '<instruction>' ASSISTANT: <expressive instruction> [IMG0]...[IMG7]</s>

Labels ignore (IGNORE_INDEX) everything up to and including "ASSISTANT:"; the targets are
the expressive instruction, the eight `[IMG]` tokens and `</s>`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mgie_jax.text.tokenizer import IM_END, IM_PATCH, IM_START, IMAGE, IMG_TOKENS, LlamaTokenizer

IGNORE_INDEX = -100
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QUESTION = "what will this image be like if '{instruction}'"
NUM_IMG_TOKENS = len(IMG_TOKENS)


@dataclasses.dataclass(frozen=True)
class Template:
  """How a LLaVA generation was taught to read an image in a prompt."""
  image_token: str          # the placeholder the image features replace, one per image token
  image_first: bool         # the image before the question (LLaVA-1.5) or after it (LLaVA v1)
  wrap: tuple = ("", "")    # tokens around the image run


TEMPLATES = {"llava_v1": Template(IM_PATCH, image_first=False, wrap=(IM_START, IM_END)),
             "llava_1_5": Template(IMAGE, image_first=True),
             # LGIE: the language model alone writes the expressive instruction from the terse one;
             # the question is MGIE's, with no image in the prompt.
             "text_only": Template("", image_first=False)}


def image_placeholder(num_image_tokens: int = 256, template: str = "llava_v1") -> str:
  t = TEMPLATES[template]
  return t.wrap[0] + t.image_token * num_image_tokens + t.wrap[1] if t.image_token else ""


def prompt_text(instruction: str, num_image_tokens: int = 256, template: str = "llava_v1") -> str:
  """The inference prompt, ending in "ASSISTANT:" (Vicuna v1.1: roles joined by ' ', turn ends '</s>')."""
  image, question = image_placeholder(num_image_tokens, template), QUESTION.format(instruction=instruction)
  if image:
    question = f"{image}\n{question}" if TEMPLATES[template].image_first else f"{question}\n{image}"
  return f"{SYSTEM} USER: {question} ASSISTANT:"


def target_text(expressive: str) -> str:
  return f" {expressive.strip()} " + " ".join(IMG_TOKENS) + "</s>"


@dataclasses.dataclass
class Example:
  input_ids: np.ndarray     # int32 [L]
  labels: np.ndarray        # int32 [L], IGNORE_INDEX where not a target
  truncated: bool = False


def training_example(tok: LlamaTokenizer, instruction: str, expressive: str, *,
                     num_image_tokens: int = 256, max_length: int = 512, template: str = "llava_v1") -> Example:
  """Token ids and labels of one training sequence; cuts the expressive text if too long."""
  prompt = tok.encode(prompt_text(instruction, num_image_tokens, template))
  text = tok.encode(expressive.strip(), add_bos=False) if expressive.strip() else []
  tail = [tok.token_to_id(t) for t in IMG_TOKENS] + [tok.eos_id]
  room = max_length - len(prompt) - len(tail)
  if room < 0:
    raise ValueError(f"prompt alone is {len(prompt)} tokens + {len(tail)} [IMG]/eos > max_length {max_length}")
  truncated = len(text) > room
  answer = text[:room] + tail
  ids = np.asarray(prompt + answer, np.int32)
  labels = np.asarray([IGNORE_INDEX] * len(prompt) + answer, np.int32)
  return Example(ids, labels, truncated)


def pad_batch(seqs, length: int, pad_id: int, side: str = "right"):
  """Stack sequences into [B, length] with a 0/1 attention mask; `side` is where padding goes."""
  out = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"sequence {i} has {len(s)} tokens > {length}")
    sl = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
    out[i, sl], mask[i, sl] = s, 1
  return out, mask


def check_image_tokens(input_ids, image_token_id: int, num_image_tokens: int) -> None:
  """Every row must hold exactly `num_image_tokens` image tokens (host-side check before jit)."""
  counts = (np.asarray(input_ids) == image_token_id).sum(axis=1)
  bad = np.nonzero(counts != num_image_tokens)[0]
  if bad.size:
    raise ValueError(f"rows {bad.tolist()} hold {counts[bad].tolist()} image tokens, expected {num_image_tokens}")


def img_window_start(input_ids, img0_id: int):
  """Index of the first of the 8 hidden states fed to the edit head: position of [IMG0] minus one.

  Those are the states whose LM-head outputs predict [IMG0..7]; the released weights depend on it.
  Works on numpy or jax arrays of shape [B, L] (array methods only: this module needs no JAX);
  rows without [IMG0] give -1 (check with `has_img`).
  """
  hit = input_ids == img0_id
  found = hit.any(axis=1).astype("int32")
  return (hit.argmax(axis=1) - 1) * found - (1 - found)
