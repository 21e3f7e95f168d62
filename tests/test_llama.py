import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import max_err, save_llama, tol
from mgie_jax.models import LlamaConfig, LlamaForCausalLM
from mgie_jax.convert import from_pretrained


def run_both(path, ref_model, ids, mask=None, positions=None, **kw):
  ours = from_pretrained(LlamaForCausalLM, path, **kw)
  t = lambda a: None if a is None else torch.as_tensor(np.asarray(a))
  with torch.no_grad():
    ref = ref_model(input_ids=t(ids), attention_mask=t(mask), position_ids=t(positions)).logits.numpy()
  out = ours(jnp.asarray(ids), attention_mask=None if mask is None else jnp.asarray(mask),
             positions=None if positions is None else jnp.asarray(positions)).logits
  return np.asarray(out, np.float32), ref


@pytest.mark.parametrize("fixture", ["llama_dir", "gqa_llama_dir"])
def test_llama_logits_parity(fixture, request):
  path, ref_model = request.getfixturevalue(fixture)
  ids = np.random.default_rng(0).integers(3, 128, (2, 11))
  out, ref = run_both(path, ref_model, ids)
  assert max_err(out, ref) <= tol(ref)


def test_gqa_config_really_groups_heads(gqa_llama_dir):
  ours = from_pretrained(LlamaForCausalLM, gqa_llama_dir[0])
  assert ours.config.num_key_value_heads == 2 and ours.config.num_attention_heads == 4
  assert ours.model.layers.self_attn.k_proj.kernel.shape == (2, 64, 2 * 16)


def test_llama_padded_batch_parity(gqa_llama_dir):
  path, ref_model = gqa_llama_dir
  rng = np.random.default_rng(1)
  ids = rng.integers(3, 128, (3, 9))
  mask = np.ones_like(ids)
  mask[1, :4] = 0      # left padding
  mask[2, 6:] = 0      # right padding
  ids[mask == 0] = 0
  positions = np.maximum(mask.cumsum(-1) - 1, 0)
  out, ref = run_both(path, ref_model, ids, mask, positions)
  real = mask.astype(bool)
  assert max_err(out[real], ref[real]) <= tol(ref[real])


def test_tied_embeddings(tmp_path):
  path, ref_model = save_llama(tmp_path, seed=3, tie_word_embeddings=True)
  ours = from_pretrained(LlamaForCausalLM, path)
  assert not hasattr(ours, "lm_head")
  ids = np.random.default_rng(2).integers(3, 128, (1, 7))
  out, ref = run_both(path, ref_model, ids)
  assert max_err(out, ref) <= tol(ref)


def test_kv_cache_decoding_equals_full_forward(gqa_llama_dir):
  model = from_pretrained(LlamaForCausalLM, gqa_llama_dir[0])
  ids = jnp.asarray(np.random.default_rng(3).integers(3, 128, (2, 10)))
  full = model(ids).logits
  cache = model.init_cache(2, 16)
  out = model(ids[:, :6], cache=cache)
  steps = [out.logits]
  cache = out.cache
  for i in range(6, 10):
    out = model(ids[:, i:i + 1], cache=cache)
    cache = out.cache
    steps.append(out.logits)
  assert int(cache["index"]) == 10
  assert max_err(jnp.concatenate(steps, axis=1), full) <= tol(full)


def test_remat_and_bf16(gqa_llama_dir):
  path, _ = gqa_llama_dir
  ids = jnp.asarray(np.random.default_rng(4).integers(3, 128, (2, 8)))
  ref = from_pretrained(LlamaForCausalLM, path)(ids).logits
  def grads_of(model):
    graphdef, state = nnx.split(model)
    loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(ids).logits ** 2)
    return jax.tree.leaves(jax.jit(jax.grad(loss))(state)), nnx.merge(graphdef, state)(ids).logits
  plain, _ = grads_of(from_pretrained(LlamaForCausalLM, path))
  for policy in ("full", "dots", "dots_no_batch"):
    grads, logits = grads_of(from_pretrained(LlamaForCausalLM, path, remat=policy))
    assert max_err(logits, ref) <= tol(ref)
    assert len(grads) == len(plain)
    for g, want in zip(grads, plain):        # every parameter's gradient, remat or not
      assert max_err(g, want) <= tol(want), policy
  bf16 = from_pretrained(LlamaForCausalLM, path, dtype="bfloat16")(ids).logits
  assert bf16.dtype == jnp.bfloat16
  # Two bf16 layers on logits of scale ~0.5: stated tolerance 2% of the logit range.
  assert max_err(bf16.astype(jnp.float32), ref) <= 0.02 * max(1.0, float(jnp.abs(ref).max()))


def test_bad_config_values():
  with pytest.raises(ValueError, match="multiple of"):
    LlamaConfig(num_attention_heads=6, num_key_value_heads=4)
  with pytest.raises(ValueError, match="rope scaling"):
    LlamaConfig.from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="remat policy"):
    cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, remat="sometimes")
    LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 2), jnp.int32))


def test_random_init_follows_initializer_range():
  """HF's `initializer_range` (read from config.json) is the std of every weight at random init."""
  hf = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, initializer_range=0.1)
  for want in (0.1, 0.02):
    model = LlamaForCausalLM(LlamaConfig.from_hf({**hf, "initializer_range": want}), rngs=nnx.Rngs(0))
    for w in (model.model.embed_tokens.embedding, model.model.layers.self_attn.q_proj.kernel,
              model.model.layers.mlp.down_proj.kernel, model.lm_head.kernel):
      std = float(np.std(np.asarray(w[...])))
      assert abs(std - want) < 0.1 * want, (want, std)
