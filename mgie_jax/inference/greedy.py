"""Greedy decoding with a KV cache, compiled once: prefill, then a `lax.scan` over new tokens.

Matches transformers' `generate(do_sample=False, no_repeat_ngram_size=n)` for left-padded
batches, and returns the last-layer hidden states MGIE reads its `[IMG]` window from.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class GenerateOutput(NamedTuple):
  sequences: jax.Array   # [B, T + max_new_tokens]: prompt (as given, left-padded) then new tokens
  hidden: jax.Array      # [B, T + max_new_tokens, D]: final-norm hidden state of each token
                         # (the last new token is never fed back, its row is zero, as in HF)
  done: jax.Array        # [B] bool: the row produced eos


def banned_ngram_tokens(seq, length, n: int, vocab: int):
  """Bool [B, vocab]: tokens that would repeat an n-gram already in seq[:, :length] (HF semantics)."""
  b, total = seq.shape
  width = total - n + 1
  windows = jnp.stack([seq[:, k:k + width] for k in range(n)], axis=-1)        # [B, W, n]
  prefix = jax.lax.dynamic_slice_in_dim(seq, length - (n - 1), n - 1, axis=1)   # [B, n-1]
  match = jnp.all(windows[:, :, :-1] == prefix[:, None, :], axis=-1)
  match &= (jnp.arange(width) <= length - n)[None] & (length + 1 >= n)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], match.shape)
  return jnp.zeros((b, vocab), bool).at[rows, windows[:, :, -1]].max(match)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "no_repeat_ngram_size",
                                             "eos_id", "pad_id"))
def _generate(graphdef, state, input_ids, attention_mask, pixel_values, *, max_new_tokens,
              no_repeat_ngram_size, eos_id, pad_id):
  model = nnx.merge(graphdef, state)
  b, t = input_ids.shape
  total = t + max_new_tokens
  mask = attention_mask.astype(bool)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  cache = model.init_cache(b, total)
  extra = {} if pixel_values is None else {"pixel_values": pixel_values}
  out = model(input_ids, attention_mask=mask, positions=positions, cache=cache, **extra)

  seq = jnp.concatenate([input_ids, jnp.full((b, max_new_tokens), pad_id, input_ids.dtype)], axis=1)
  hidden = jnp.zeros((b, total, out.hidden_states.shape[-1]), out.hidden_states.dtype)
  hidden = hidden.at[:, :t].set(out.hidden_states)
  next_pos = positions[:, -1] + 1

  def pick(logits, seq, length, done):
    logits = logits.astype(jnp.float32)
    if no_repeat_ngram_size > 0:
      banned = banned_ngram_tokens(seq, length, no_repeat_ngram_size, logits.shape[-1])
      logits = jnp.where(banned, -jnp.inf, logits)
    tok = jnp.argmax(logits, axis=-1).astype(seq.dtype)
    tok = jnp.where(done, pad_id, tok)
    seq = jax.lax.dynamic_update_slice_in_dim(seq, tok[:, None], length, axis=1)
    return tok, seq, done | (tok == eos_id)

  tok, seq, done = pick(out.logits[:, -1], seq, t, jnp.zeros((b,), bool))

  def step(carry, i):
    tok, seq, done, cache, hidden = carry
    length = t + i - 1      # index of `tok` in seq; we feed it and write the next one after it
    o = model(tok[:, None], attention_mask=jnp.ones((b, 1), bool),
              positions=(next_pos + i - 1)[:, None], cache=cache)
    hidden = jax.lax.dynamic_update_slice_in_dim(hidden, o.hidden_states, length, axis=1)
    tok, seq, done = pick(o.logits[:, -1], seq, length + 1, done)
    return (tok, seq, done, o.cache, hidden), None

  (tok, seq, done, _, hidden), _ = jax.lax.scan(
      step, (tok, seq, done, out.cache, hidden), jnp.arange(1, max_new_tokens))
  return GenerateOutput(seq, hidden, done)


def greedy_generate(model, input_ids, attention_mask=None, *, pixel_values=None,
                    max_new_tokens: int = 96, no_repeat_ngram_size: int = 0,
                    eos_id: int = 2, pad_id: int = 0) -> GenerateOutput:
  """Greedy decoding of left-padded prompts [B, T] with `model` (LlamaForCausalLM or LLaVA).

  New tokens after eos are `pad_id`. Compiles once per (model structure, shapes, options).
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  am = np.asarray(attention_mask)
  if am.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {am.shape} != input_ids shape {input_ids.shape}")
  if (am[:, -1] == 0).any():
    raise ValueError("prompts must be left-padded: the last column of attention_mask has padding")
  if max_new_tokens < 1:
    raise ValueError("max_new_tokens must be >= 1")
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, input_ids, jnp.asarray(attention_mask), pixel_values,
                   max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size,
                   eos_id=eos_id, pad_id=pad_id)


# --- greedy decoding in chunks: the caller stops as soon as the text it keeps is decided -------

@functools.partial(jax.jit, static_argnames=("graphdef", "total", "eos_id", "pad_id"))
def _prefill(graphdef, state, input_ids, attention_mask, pixel_values, *, total, eos_id, pad_id):
  model = nnx.merge(graphdef, state)
  b, t = input_ids.shape
  mask = attention_mask.astype(bool)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  out = model(input_ids, attention_mask=mask, positions=positions, cache=model.init_cache(b, total),
              pixel_values=pixel_values)
  tok = jnp.argmax(out.logits[:, -1].astype(jnp.float32), axis=-1).astype(input_ids.dtype)
  seq = jnp.concatenate([input_ids, jnp.full((b, total - t), pad_id, input_ids.dtype)], axis=1)
  seq = seq.at[:, t].set(tok)
  return tok, seq, tok == eos_id, out.cache, positions[:, -1] + 1


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "eos_id", "pad_id"), donate_argnums=(2,))
def _extend(graphdef, state, carry, start, *, steps, eos_id, pad_id):
  """`steps` more greedy tokens; `start` is the index in seq of the last token written."""
  model = nnx.merge(graphdef, state)

  def step(carry, i):
    tok, seq, done, cache, pos = carry
    o = model(tok[:, None], attention_mask=jnp.ones((tok.shape[0], 1), bool), positions=(pos + i)[:, None],
              cache=cache)
    nxt = jnp.argmax(o.logits[:, -1].astype(jnp.float32), axis=-1).astype(seq.dtype)
    nxt = jnp.where(done, pad_id, nxt)
    seq = jax.lax.dynamic_update_slice_in_dim(seq, nxt[:, None], start + i + 1, axis=1)
    return (nxt, seq, done | (nxt == eos_id), o.cache, pos), None

  tok, seq, done, cache, pos = jax.lax.scan(step, carry, jnp.arange(steps))[0]
  return tok, seq, done, cache, pos + steps


def greedy_chunks(model, input_ids, attention_mask, *, pixel_values=None, max_new_tokens: int,
                  chunk: int = 32, eos_id: int = 2, pad_id: int = 0):
  """Greedy decoding of left-padded prompts that yields (new tokens [B, n] so far, done [B]) every
  `chunk` tokens; stop iterating to stop decoding. The tokens equal `greedy_generate`'s (no n-gram
  blocking): the same step, run in pieces."""
  input_ids = jnp.asarray(input_ids, jnp.int32)
  t = input_ids.shape[1]
  total = t + -(-max_new_tokens // chunk) * chunk          # whole chunks: one compiled extend
  graphdef, state = nnx.split(model)
  carry = _prefill(graphdef, state, input_ids, jnp.asarray(attention_mask), pixel_values, total=total,
                   eos_id=eos_id, pad_id=pad_id)
  written = 1
  while True:
    # Copies (np.array), since the carry is donated to the next chunk.
    tokens, done = np.array(carry[1][:, t:t + min(written, max_new_tokens)]), np.array(carry[2])
    yield tokens, done
    if written >= max_new_tokens or done.all():
      return
    carry = _extend(graphdef, state, carry, t + written - 1, steps=chunk, eos_id=eos_id, pad_id=pad_id)
    written += chunk
