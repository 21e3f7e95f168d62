"""Encoder-decoder generation (T5): beam search and greedy, one compiled `lax.while_loop` each.

Token-identical to transformers' `generate` (the vectorised beam search of transformers >= 4.50):
keep the best 2 x num_beams continuations of all beams, finish those that end in `</s>` or reach
`max_length`, keep the best `num_beams` unfinished ones running, and stop when no running beam can
beat the finished ones (or, with `early_stopping=True`, when every beam slot is finished). Scores
are summed log-probabilities divided by `generated_length ** length_penalty`. Shapes are static:
sequences are `max_length` long, filled after their end as transformers fills them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgie_jax.inference.greedy import banned_ngram_tokens

NEG = -1.0e9   # transformers' "very large negative" for beams that may not be chosen


class Seq2SeqGenerated(NamedTuple):
  sequences: jax.Array   # [B, max_length]: decoder_start_token, the tokens, then filler
  lengths: jax.Array     # [B] generated tokens (without the start token)


def _processed_log_probs(logits, seq, cur_len, *, min_length, no_repeat_ngram_size, eos_id):
  """log-softmax, then transformers' NoRepeatNGram and MinLength processors (both set -inf)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if no_repeat_ngram_size > 0:
    banned = banned_ngram_tokens(seq, cur_len, no_repeat_ngram_size, log_probs.shape[-1])
    log_probs = jnp.where(banned, -jnp.inf, log_probs)
  if min_length > 0:
    is_eos = jnp.arange(log_probs.shape[-1]) == eos_id
    log_probs = jnp.where(is_eos[None] & (cur_len < min_length), -jnp.inf, log_probs)
  return log_probs


def _gather(x, idx):
  """x [B, N, ...], idx [B, M] -> [B, M, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_beams", "max_length", "min_length",
                                             "length_penalty", "early_stopping", "no_repeat_ngram_size"))
def _beam_search(graphdef, state, input_ids, attention_mask, *, num_beams, max_length, min_length,
                 length_penalty, early_stopping, no_repeat_ngram_size):
  model = nnx.merge(graphdef, state)
  cfg = model.config
  b, k, total = input_ids.shape[0], num_beams, max_length
  eos, start = cfg.eos_token_id, cfg.decoder_start_token_id
  fill = cfg.pad_token_id or eos                   # transformers: `pad_token_id or eos_token_id`
  keep = 2 * k                                     # candidates kept per step (one eos id)
  top_mask = jnp.arange(keep) < k
  # Length-penalty divisors in double precision, cast once: what torch does with a Python float.
  divisor = jnp.asarray(np.maximum(np.arange(total + 1), 1).astype(np.float64) ** length_penalty, jnp.float32)
  best_len_never = early_stopping == "never" and length_penalty > 0.0

  encoded = model.encode(input_ids, attention_mask)
  encoded = jnp.repeat(encoded, k, axis=0)
  enc_mask = jnp.repeat(attention_mask, k, axis=0)
  cross_kv = model.decoder.cross_key_values(encoded)
  cache = model.init_cache(b * k, total)

  running = jnp.full((b, k, total), fill, jnp.int32).at[:, :, 0].set(start)
  init = dict(
      cur_len=jnp.asarray(1, jnp.int32), cache=cache, running=running,
      running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),
      sequences=running, scores=jnp.full((b, k), NEG, jnp.float32),
      lengths=jnp.zeros((b, k), jnp.int32), finished=jnp.zeros((b, k), bool),
      improvable=jnp.ones((b, 1), bool), all_hit=jnp.asarray(False))

  def cond(s):
    open_slot = ~(jnp.all(s["finished"]) & (early_stopping is True))
    return jnp.any(s["improvable"]) & open_slot & ~s["all_hit"] & (s["cur_len"] < total)

  def body(s):
    cur_len = s["cur_len"]
    last = jax.lax.dynamic_slice_in_dim(s["running"], cur_len - 1, 1, axis=2).reshape(b * k, 1)
    out = model.decode(last, cross_kv, enc_mask, cache=s["cache"])
    flat = s["running"].reshape(b * k, total)
    log_probs = _processed_log_probs(out.logits[:, -1], flat, cur_len, min_length=min_length,
                                     no_repeat_ngram_size=no_repeat_ngram_size, eos_id=eos)
    vocab = log_probs.shape[-1]
    log_probs = (log_probs.reshape(b, k, vocab) + s["running_scores"][:, :, None]).reshape(b, k * vocab)

    # The best `keep` continuations over all beams.
    top_scores, top_idx = jax.lax.top_k(log_probs, keep)
    source, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = _gather(s["running"], source)
    top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, token[:, :, None], cur_len, axis=2)
    hits = (token == eos) | (cur_len + 1 >= total)

    # Unfinished continuations keep running.
    run_scores = top_scores + hits.astype(jnp.float32) * NEG
    nxt = jax.lax.top_k(run_scores, k)[1]
    running, running_scores = _gather(top_seqs, nxt), _gather(run_scores, nxt)
    beam_src = (_gather(source, nxt) + jnp.arange(b)[:, None] * k).reshape(-1)

    # Finished ones among the top `num_beams` compete for the finished slots.
    just = hits & top_mask[None]
    fin = top_scores / divisor[cur_len]
    full = jnp.all(s["finished"], axis=-1, keepdims=True) & (early_stopping is True)
    fin = fin + full.astype(jnp.float32) * NEG
    fin = fin + (~s["improvable"]).astype(jnp.float32) * NEG
    fin = fin + (~just).astype(jnp.float32) * NEG
    merged_scores = jnp.concatenate([s["scores"], fin], axis=1)
    sel = jax.lax.top_k(merged_scores, k)[1]
    sequences = _gather(jnp.concatenate([s["sequences"], top_seqs], axis=1), sel)
    lengths = _gather(jnp.concatenate([s["lengths"], jnp.full((b, keep), cur_len, jnp.int32)], axis=1), sel)
    finished = _gather(jnp.concatenate([s["finished"], just], axis=1), sel)
    scores = _gather(merged_scores, sel)

    cache = dict(out.cache)
    cache["k"], cache["v"] = (jnp.take(cache[n], beam_src, axis=1) for n in ("k", "v"))
    cache["valid"] = jnp.take(cache["valid"], beam_src, axis=0)

    cur_len = cur_len + 1
    best_len = (total - 1) if best_len_never else (cur_len - 1)
    best_running = running_scores[:, :1] / divisor[best_len]
    worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
    improvable = s["improvable"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
    return dict(cur_len=cur_len, cache=cache, running=running, running_scores=running_scores,
                sequences=sequences, scores=scores, lengths=lengths, finished=finished,
                improvable=improvable, all_hit=jnp.all(hits))

  s = jax.lax.while_loop(cond, body, init)
  return Seq2SeqGenerated(s["sequences"][:, 0], s["lengths"][:, 0])


@functools.partial(jax.jit, static_argnames=("graphdef", "max_length", "min_length", "no_repeat_ngram_size"))
def _greedy(graphdef, state, input_ids, attention_mask, *, max_length, min_length, no_repeat_ngram_size):
  model = nnx.merge(graphdef, state)
  cfg = model.config
  b, total = input_ids.shape[0], max_length
  eos, pad = cfg.eos_token_id, cfg.pad_token_id
  cross_kv = model.decoder.cross_key_values(model.encode(input_ids, attention_mask))
  seq = jnp.full((b, total), pad, jnp.int32).at[:, 0].set(cfg.decoder_start_token_id)
  init = (jnp.asarray(1, jnp.int32), seq, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
          model.init_cache(b, total))

  def cond(s):
    return ~jnp.all(s[2]) & (s[0] < total)

  def body(s):
    cur_len, seq, done, lengths, cache = s
    last = jax.lax.dynamic_slice_in_dim(seq, cur_len - 1, 1, axis=1)
    out = model.decode(last, cross_kv, attention_mask, cache=cache)
    log_probs = _processed_log_probs(out.logits[:, -1], seq, cur_len, min_length=min_length,
                                     no_repeat_ngram_size=no_repeat_ngram_size, eos_id=eos)
    token = jnp.where(done, pad, jnp.argmax(log_probs, axis=-1).astype(jnp.int32))
    seq = jax.lax.dynamic_update_slice_in_dim(seq, token[:, None], cur_len, axis=1)
    lengths = jnp.where(done, lengths, cur_len)
    return cur_len + 1, seq, done | (token == eos), lengths, out.cache

  _, seq, _, lengths, _ = jax.lax.while_loop(cond, body, init)
  return Seq2SeqGenerated(seq, lengths)


def generate(model, input_ids, attention_mask, *, num_beams: int = 1, max_length: int = 20,
             min_length: int = 0, length_penalty: float = 1.0, early_stopping: bool | str = False,
             no_repeat_ngram_size: int = 0) -> Seq2SeqGenerated:
  """transformers-style `generate` for a T5 model on a (right-padded) batch of encoder inputs.
  `max_length` counts the decoder start token, as in transformers."""
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
  if max_length < 2:
    raise ValueError(f"max_length must be at least 2 (the start token and one more), got {max_length}")
  graphdef, state = nnx.split(model)
  ids, mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
  if num_beams == 1:
    return _greedy(graphdef, state, ids, mask, max_length=max_length, min_length=min_length,
                   no_repeat_ngram_size=no_repeat_ngram_size)
  return _beam_search(graphdef, state, ids, mask, num_beams=num_beams, max_length=max_length,
                      min_length=min_length, length_penalty=float(length_penalty),
                      early_stopping=early_stopping, no_repeat_ngram_size=no_repeat_ngram_size)


def trimmed(out: Seq2SeqGenerated) -> np.ndarray:
  """The batch cropped as transformers returns it: start token + the longest row's tokens."""
  seq, lengths = np.asarray(out.sequences), np.asarray(out.lengths)
  return seq[:, :1 + int(lengths.max())]
