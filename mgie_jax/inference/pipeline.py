"""MGIE inference: image + terse instruction -> expressive instruction -> edited image.

1. LLaVA greedily writes the expressive instruction (KV-cached, `no_repeat_ngram_size=3`).
2. The prompt, the text it wrote and [IMG0..7] are run once more, teacher-forced, to read the
   [IMG] window's last-layer states (identical to the states decoding produced when the model
   wrote the [IMG] tokens itself, and well defined when it did not).
3. The edit head gives the condition U and the null condition; the InstructPix2Pix sampler
   edits the VAE latents of the input image.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from mgie_jax.core.images import clip_view, mgie_square, to_model_range
from mgie_jax.diffusion import SamplerConfig, edit_images, make_sampler
from mgie_jax.inference.greedy import greedy_generate
from mgie_jax.text import (IGNORE_INDEX, IMG_TOKENS, check_image_tokens, img_window_start, pad_batch, prompt_text,
                           training_example)


def prepare(images, resolution: int, clip_resolution: int):
  """PIL images -> ([B, R, R, 3] in [-1, 1], [B, c, c, 3] CLIP-normalised), MGIE's preprocessing."""
  squares = [mgie_square(im.convert("RGB")) for im in images]
  return (np.stack([to_model_range(s, resolution) for s in squares]),
          np.stack([clip_view(s, clip_resolution) for s in squares]))


def padded_length(rows, multiple: int = 1) -> int:
  """The longest row's length rounded up to `multiple` (left padding to a few lengths: few compiles)."""
  longest = max(map(len, rows))
  return -(-longest // multiple) * multiple


def expressive_instructions(model, tok, clip_images, instructions, *, max_new_tokens: int = 96,
                            no_repeat_ngram_size: int = 3, length_multiple: int = 1):
  """Generate the expressive instructions; returns (texts, condition U, null condition).
  Prompts and written sequences are left-padded to a multiple of `length_multiple`."""
  cfg = model.config
  n_img = cfg.prompt_image_tokens
  prompts = [tok.encode(prompt_text(i, n_img, cfg.template)) for i in instructions]
  ids, mask = pad_batch(prompts, padded_length(prompts, length_multiple), pad_id=0, side="left")
  check_image_tokens(ids, cfg.llava.image_token_id, n_img)
  out = greedy_generate(model.mllm, ids, mask, pixel_values=_mllm_pixels(cfg, clip_images),
                        max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size,
                        eos_id=tok.eos_id)
  stop = {tok.eos_id, 0} | {tok.token_to_id(t) for t in IMG_TOKENS}
  img_ids = [tok.token_to_id(t) for t in IMG_TOKENS]
  texts, full = [], []
  for row, prompt in zip(np.asarray(out.sequences)[:, ids.shape[1]:], prompts):
    gen = []
    for t in row.tolist():
      if t in stop:
        break
      gen.append(t)
    texts.append(tok.decode(gen))
    full.append(prompt + gen + img_ids)
  ids, mask = pad_batch(full, padded_length(full, length_multiple), pad_id=0, side="left")
  return texts, *conditions_for(model, ids, mask, clip_images)


def conditions_for(model, ids, mask, clip_images):
  """(U, null) for full sequences that end in [IMG0..7]; every row must hold [IMG0]."""
  ids = np.asarray(ids)
  missing = np.nonzero(img_window_start(ids, model.config.img_token_id) < 0)[0]
  if missing.size:
    raise ValueError(f"rows {missing.tolist()} hold no [IMG0]: there is no [IMG] window to read")
  return _conditions(model, jnp.asarray(ids), jnp.asarray(mask), _mllm_pixels(model.config, clip_images))


def _mllm_pixels(cfg, clip_images):
  """The CLIP view for the language model, or None for LGIE (which never sees the image)."""
  return jnp.asarray(clip_images) if cfg.sees_image else None


@nnx.jit
def _conditions(model, ids, mask, clip_images):
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  out = model.mllm(ids, clip_images, attention_mask=mask, positions=positions)
  return model.conditions(out.hidden_states, ids)


def teacher_forced_accuracy(model, tok, clip_images, instructions, references) -> np.ndarray:
  """Per example: the share of the reference answer's tokens (expressive instruction, [IMG0..7],
  </s>) that the MLLM predicts, teacher-forced, as L_ins scores them."""
  exs = _reference_sequences(model, tok, instructions, references)
  length = max(len(e.input_ids) for e in exs)
  ids, mask = pad_batch([e.input_ids for e in exs], length, pad_id=0, side="right")
  labels, _ = pad_batch([e.labels for e in exs], length, pad_id=IGNORE_INDEX, side="right")
  right, total = _token_hits(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels),
                             _mllm_pixels(model.config, clip_images))
  return np.asarray(right) / np.maximum(np.asarray(total), 1)


@nnx.jit
def _token_hits(model, ids, mask, labels, clip_images):
  logits = model.mllm(ids, clip_images, attention_mask=mask).logits[:, :-1]
  target = labels[:, 1:]
  valid = target >= 0
  return jnp.sum((jnp.argmax(logits, -1) == target) & valid, axis=1), jnp.sum(valid, axis=1)


def _reference_sequences(model, tok, instructions, references):
  """Training's sequences (prompt, reference expressive instruction, [IMG0..7], </s>), uncut."""
  n_img = model.config.prompt_image_tokens
  return [training_example(tok, i, r, num_image_tokens=n_img, max_length=10 ** 6, template=model.config.template)
          for i, r in zip(instructions, references)]


def reference_conditions(model, tok, clip_images, instructions, references):
  """(texts, U, null) with each example's reference expressive instruction in place of the one the
  MLLM would write: the prompt, the reference and [IMG0..7], teacher-forced exactly as training
  sees them. Isolates the edit head and the UNet from the MLLM's writing (evaluate's
  `expressive="reference"`)."""
  rows = [e.input_ids for e in _reference_sequences(model, tok, instructions, references)]
  ids, mask = pad_batch(rows, max(map(len, rows)), pad_id=0, side="left")   # as after generation
  return list(references), *conditions_for(model, ids, mask, clip_images)


def instruction_ids(tok, instructions, length: int):
  """The terse instructions as a text-only editor reads them: bos ... eos, padded to `length`."""
  rows = [tok.encode(i)[:length - 1] + [tok.eos_id] for i in instructions]
  return pad_batch(rows, length, pad_id=0, side="right")


@nnx.jit
def _text_conditions(model, ids, mask):
  return model.conditions(ids, mask)


def conditions(model, tok, clip_images, instructions, *, max_new_tokens: int = 96, references=None,
               length_multiple: int = 1):
  """(texts, cond, null) for any editor model: MGIE writes expressive instructions (or, given
  `references`, is conditioned on those); the text-only baseline encodes the terse ones
  (returned as its texts)."""
  if hasattr(model, "mllm"):
    if references is not None:
      return reference_conditions(model, tok, clip_images, instructions, references)
    return expressive_instructions(model, tok, clip_images, instructions, max_new_tokens=max_new_tokens,
                                   length_multiple=length_multiple)
  ids, mask = instruction_ids(tok, instructions, model.config.text_length)
  cond, null = _text_conditions(model, jnp.asarray(ids), jnp.asarray(mask))
  return list(instructions), cond, null


def default_sampler(model, kind: str = "euler_ancestral") -> SamplerConfig:
  """MGIE's sampler (Euler-ancestral) on the noise schedule the model was trained with."""
  return SamplerConfig(kind=kind, schedule=model.config.noise)


def edit(model, tok, images, instructions, *, key, resolution: int = 512, steps: int = 100,
         text_scale: float = 7.5, image_scale: float = 1.5, sampler: SamplerConfig | None = None,
         max_new_tokens: int = 96):
  """Edit PIL `images` by terse `instructions`; returns (uint8 [B, R, R, 3] edited images, texts).
  `sampler` defaults to Euler-ancestral on the model's own noise schedule."""
  pixels, clip = prepare(images, resolution, model.config.clip_size)
  texts, cond, null = conditions(model, tok, clip, instructions, max_new_tokens=max_new_tokens)
  sampler = make_sampler(sampler or default_sampler(model), steps)
  out = edit_images(model.unet, model.vae, sampler, jnp.asarray(pixels), cond, null, key=key,
                    text_scale=text_scale, image_scale=image_scale)
  return np.asarray(jnp.round(out * 255)).astype(np.uint8), texts


def wrap_text(draw, text: str, width: int) -> list[str]:
  """`text` broken at spaces into lines no wider than `width` pixels (a longer word is split)."""
  lines, line = [], ""
  for word in text.split():
    while len(word) > 1 and draw.textlength(word) > width:      # one word wider than the row
      cut = len(word) - 1
      while cut > 1 and draw.textlength(word[:cut]) > width:
        cut -= 1
      if line:
        lines.append(line)
        line = ""
      lines.append(word[:cut])
      word = word[cut:]
    candidate = f"{line} {word}".strip()
    if line and draw.textlength(candidate) > width:
      lines.append(line)
      candidate = word
    line = candidate
  return lines + ([line] if line else [])


def sample_grid(inputs, outputs, texts, instructions, cell: int = 192) -> Image.Image:
  """A PNG-able grid: one row per example (input | edit), captioned with both instructions,
  wrapped to the row's width."""
  line_h, pad, width = 12, 4, 2 * cell
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  captions = [[(line, (0, 0, 0)) for line in wrap_text(measure, f"instruction: {i}", width - 2 * pad)] +
              [(line, (60, 60, 160)) for line in wrap_text(measure, f"expressive: {t}", width - 2 * pad)]
              for t, i in zip(texts, instructions)]
  heights = [cell + len(c) * line_h + 2 * pad for c in captions]
  grid = Image.new("RGB", (width, sum(heights)), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  y = 0
  for a, b, caption, h in zip(inputs, outputs, captions, heights):
    grid.paste(Image.fromarray(a).resize((cell, cell)), (0, y))
    grid.paste(Image.fromarray(b).resize((cell, cell)), (cell, y))
    for k, (line, colour) in enumerate(caption):
      draw.text((pad, y + cell + pad + k * line_h), line, fill=colour)
    y += h
  return grid
