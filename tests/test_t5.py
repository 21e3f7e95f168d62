"""T5 v1.1 port, beam search and tokenizer vs transformers (tiny random configs).

Tolerances: logits within 1e-4 x max(1, |reference|) in fp32 (docs/design.md, "Testing without accelerators or weights"); generated tokens and
tokenizer ids exactly equal."""

import numpy as np
import pytest
import torch

from conftest import max_err, tol
from expressive_fixtures import make_t5
from mgie_jax.inference.beam import generate, trimmed
from mgie_jax.models.t5 import T5ForConditionalGeneration, relative_position_buckets
from mgie_jax.text.t5_tokenizer import T5Tokenizer
from mgie_jax.convert import from_pretrained


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  return make_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def batch(t5_dir):
  vocab = t5_dir[1].config.vocab_size
  rng = np.random.default_rng(0)
  ids = rng.integers(3, vocab, (4, 14))
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  mask[3, 4:] = 0
  ids[mask == 0] = 0
  return ids, mask


def test_relative_position_buckets_match_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = torch.arange(-600, 601)[None]
  for bidirectional in (True, False):
    for buckets, distance in ((32, 128), (8, 16)):
      want = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets,
                                                   max_distance=distance).numpy()[0]
      got = relative_position_buckets(rel.numpy()[0], bidirectional=bidirectional, num_buckets=buckets,
                                      max_distance=distance)
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("variant", ["v1.1", "v1.0"])
def test_t5_logits_match_transformers(tmp_path, variant, batch):
  """Encoder and decoder on a padded batch; v1.0 (ReLU, tied rescaled head) as well as v1.1."""
  extra = {} if variant == "v1.1" else dict(feed_forward_proj="relu", tie_word_embeddings=True)
  path, ref = make_t5(tmp_path, seed=1, eos_boost=1.0, **extra)
  ours = from_pretrained(T5ForConditionalGeneration, path)
  ids, mask = batch
  dec = np.random.default_rng(1).integers(2, ref.config.vocab_size, (4, 11))
  dec[:, 0] = 0
  with torch.no_grad():
    enc_ref = ref.encoder(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).last_hidden_state.numpy()
    want = ref(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
               decoder_input_ids=torch.as_tensor(dec)).logits.numpy()
  enc = np.asarray(ours.encode(ids, mask))
  real = mask.astype(bool)
  assert max_err(enc[real], enc_ref[real]) <= tol(enc_ref)
  got = np.asarray(ours(ids, mask, dec).logits)
  assert max_err(got, want) <= tol(want)
  assert np.abs(want).max() > 1.0          # a test that could fail: logits are not tiny


SETTINGS = [
    # the summariser's: the notebook's values over a config that asks for length_penalty 2 / early stop
    dict(num_beams=5, min_length=5, max_length=64, no_repeat_ngram_size=3, length_penalty=2.0, early_stopping=True),
    dict(num_beams=5, min_length=5, max_length=24, no_repeat_ngram_size=3),
    dict(num_beams=3, max_length=16, length_penalty=0.6, early_stopping="never"),
    dict(num_beams=1, max_length=20, min_length=3, no_repeat_ngram_size=2),    # greedy
]


@pytest.mark.parametrize("kw", SETTINGS, ids=["summariser", "default-stop", "never", "greedy"])
def test_generate_is_token_identical_to_transformers(t5_dir, batch, kw):
  path, ref = t5_dir
  ours = from_pretrained(T5ForConditionalGeneration, path)
  ids, mask = batch
  with torch.no_grad():
    want = ref.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                        **kw).numpy()
  out = generate(ours, ids, mask, **kw)
  got = trimmed(out)
  assert got.shape == want.shape and (got == want).all(), (got, want)
  if kw["num_beams"] > 1:
    # Beams ended at </s> at different lengths: the search's finishing logic was exercised.
    lengths = np.asarray(out.lengths)
    assert (lengths < kw["max_length"] - 1).any() and len(set(lengths.tolist())) > 1, lengths


def test_t5_tokenizer_matches_transformers(t5_dir):
  import transformers
  path = t5_dir[0]
  ours = T5Tokenizer.from_pretrained(path)
  ref = transformers.T5Tokenizer.from_pretrained(path, extra_ids=0)
  texts = ["summarize the following paragraph in 32 words:\n\nthe sky is blue.the circle will be red.",
           "  the   image  with more blue  ", "Zebra: 42 words!", ""]
  for t in texts:
    assert ours.encode(t) == ref(t)["input_ids"]
    assert ours.decode(ours.encode(t)) == ref.decode(ref(t)["input_ids"], skip_special_tokens=True)
  long = " ".join(["the sky"] * 400)
  assert ours.encode(long) == ref(long, truncation=True, max_length=512)["input_ids"] and len(ours.encode(long)) == 512
