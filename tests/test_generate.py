import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import max_err, tol
from mgie_jax.inference.greedy import banned_ngram_tokens, greedy_generate
from mgie_jax.models import LlamaForCausalLM, LlavaForConditionalGeneration
from mgie_jax.convert import from_pretrained

NEW = 28


def left_padded(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 128, (2, 9))
  mask = np.ones_like(ids)
  mask[1, :4] = 0            # second prompt is 4 tokens shorter
  ids[mask == 0] = 0
  return ids, mask


def hf_generate(model, ids, mask, eos=None, **kw):
  with torch.no_grad():
    return model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                          do_sample=False, max_new_tokens=NEW, no_repeat_ngram_size=3,
                          pad_token_id=0, eos_token_id=eos, **kw).numpy()


@pytest.mark.parametrize("fixture", ["llama_dir", "gqa_llama_dir"])
def test_greedy_matches_transformers(fixture, request):
  path, ref = request.getfixturevalue(fixture)
  ids, mask = left_padded()
  want = hf_generate(ref, ids, mask, min_new_tokens=NEW)
  got = greedy_generate(from_pretrained(LlamaForCausalLM, path), ids, mask, max_new_tokens=NEW,
                        no_repeat_ngram_size=3, eos_id=-1)
  assert want.shape == (2, 9 + NEW)
  np.testing.assert_array_equal(np.asarray(got.sequences), want)


def test_greedy_stops_on_eos_and_pads(gqa_llama_dir):
  path, ref = gqa_llama_dir
  ids, mask = left_padded(1)
  model = from_pretrained(LlamaForCausalLM, path)
  free = np.asarray(greedy_generate(model, ids, mask, max_new_tokens=NEW, no_repeat_ngram_size=3,
                                    eos_id=-1).sequences)
  eos = int(free[0, 9 + 6])    # a token row 0 emits at step 6 becomes "eos"
  want = hf_generate(ref, ids, mask, eos=eos)
  got = greedy_generate(model, ids, mask, max_new_tokens=NEW, no_repeat_ngram_size=3, eos_id=eos)
  seq = np.asarray(got.sequences)
  np.testing.assert_array_equal(seq[:, :want.shape[1]], want)
  assert bool(got.done[0])
  first = 9 + int(np.argmax(seq[0, 9:] == eos))
  assert (seq[0, first + 1:] == 0).all(), "tokens after eos must be padding"


def test_hidden_states_are_teacher_forced_states(gqa_llama_dir):
  model = from_pretrained(LlamaForCausalLM, gqa_llama_dir[0])
  ids, mask = left_padded(2)
  out = greedy_generate(model, ids, mask, max_new_tokens=8, eos_id=-1)
  seq = np.asarray(out.sequences)
  full_mask = np.concatenate([mask, np.ones((2, 8), mask.dtype)], axis=1)
  positions = np.maximum(full_mask.cumsum(-1) - 1, 0)
  ref = model(jnp.asarray(seq), attention_mask=jnp.asarray(full_mask), positions=jnp.asarray(positions))
  real = full_mask.astype(bool)
  real[:, -1] = False        # the last new token is never fed back
  want = np.asarray(ref.hidden_states)[real]
  assert max_err(np.asarray(out.hidden)[real], want) <= tol(want)
  assert (np.asarray(out.hidden)[:, -1] == 0).all()


def test_llava_greedy_matches_transformers(tmp_path):
  import transformers
  from conftest import TINY_CLIP, TINY_LLAMA
  torch.manual_seed(0)
  cfg = transformers.LlavaConfig(vision_config={**TINY_CLIP, "model_type": "clip_vision_model"},
                                 text_config={**TINY_LLAMA, "model_type": "llama"}, image_token_id=120)
  ref = transformers.LlavaForConditionalGeneration(cfg).eval()
  ref.save_pretrained(tmp_path)
  rng = np.random.default_rng(4)
  text = lambda n: rng.integers(3, 100, n).tolist()
  rows = [text(2) + [120] * 16 + text(7),      # 25 tokens
          text(2) + [120] * 16 + text(3)]      # 21 tokens, left-padded to 25
  ids = np.zeros((2, 25), np.int64)
  mask = np.zeros((2, 25), np.int64)
  for i, r in enumerate(rows):
    ids[i, 25 - len(r):], mask[i, 25 - len(r):] = r, 1
  px = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
  want = hf_generate(ref, ids, mask, pixel_values=px, min_new_tokens=NEW)
  ours = from_pretrained(LlavaForConditionalGeneration, str(tmp_path))
  got = greedy_generate(ours, ids, mask, pixel_values=jnp.asarray(px.numpy().transpose(0, 2, 3, 1)),
                        max_new_tokens=NEW, no_repeat_ngram_size=3, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(got.sequences), want)


def test_banned_ngrams_by_hand():
  # sequence 5 6 7 5 6 | next: the 3-gram "5 6 7" exists, so after "5 6" token 7 is banned.
  seq = jnp.asarray([[5, 6, 7, 5, 6, 0, 0]])
  banned = np.asarray(banned_ngram_tokens(seq, 5, 3, 10))
  assert banned[0].tolist() == [i == 7 for i in range(10)]
  assert not np.asarray(banned_ngram_tokens(seq, 4, 3, 10)).any()   # prefix "7 5" never seen


def test_generate_rejects_right_padding(gqa_llama_dir):
  model = from_pretrained(LlamaForCausalLM, gqa_llama_dir[0])
  with pytest.raises(ValueError, match="left-padded"):
    greedy_generate(model, np.ones((1, 4), np.int32), np.asarray([[1, 1, 1, 0]]), max_new_tokens=2)
