import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import transformers

from mgie_jax.models.mgie import gather_img_window
from mgie_jax.text import (IGNORE_INDEX, IMG_TOKENS, SYSTEM, LlamaTokenizer, img_window_start, pad_batch, prompt_text, target_text, training_example)

EXPRESSIVE = "change the red circle at the top left to blue."


@pytest.fixture(scope="module")
def tok(sp_dir):
  return LlamaTokenizer.from_pretrained(sp_dir)


def test_mgie_tokens_follow_the_vocabulary(tok):
  assert len(tok) == 400 + 11
  assert [tok.token_to_id(t) for t in ("<im_patch>", "<im_start>", "<im_end>")] == [400, 401, 402]
  assert [tok.token_to_id(t) for t in IMG_TOKENS] == list(range(403, 411))


def test_folder_added_tokens_keep_their_ids(sp_dir, tmp_path):
  folder = shutil.copytree(sp_dir, tmp_path / "llava_tok")
  with open(os.path.join(folder, "added_tokens.json"), "w") as f:
    json.dump({"<im_start>": 400, "<im_end>": 401, "<im_patch>": 402}, f)
  t = LlamaTokenizer.from_pretrained(str(folder))
  assert t.token_to_id("<im_patch>") == 402 and t.token_to_id("[IMG0]") == 403 and len(t) == 411


def test_template_hand_computed(tok, sp_dir):
  """The official template, composed by hand from SentencePiece pieces and special ids."""
  sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "tokenizer.model"))
  n_img = 4
  head = sp.encode(f"{SYSTEM} USER: what will this image be like if 'make it blue'")
  prompt = [1] + head + [401] + [400] * n_img + [402] + sp.encode("ASSISTANT:")
  answer = sp.encode(EXPRESSIVE) + list(range(403, 411)) + [2]
  ex = training_example(tok, "make it blue", EXPRESSIVE, num_image_tokens=n_img, max_length=512)
  assert ex.input_ids.tolist() == prompt + answer
  assert ex.labels.tolist() == [IGNORE_INDEX] * len(prompt) + answer
  # Prompt + target as one string tokenizes the same: the slow tokenizer strips the spaces
  # around added tokens, so "... blue. [IMG0] [IMG1] ..." gives contiguous [IMG] ids.
  assert tok.encode(prompt_text("make it blue", n_img) + target_text(EXPRESSIVE)) == prompt + answer
  # The last label-masked token is the ':' of "ASSISTANT:".
  last_masked = len(prompt) - 1
  assert sp.id_to_piece(ex.input_ids[last_masked]).endswith(":")
  # [IMG] window: starts one before [IMG0], i.e. at the last token of the expressive text.
  img0 = len(prompt) + len(sp.encode(EXPRESSIVE))
  start = img_window_start(ex.input_ids[None], 403)
  assert start.tolist() == [img0 - 1]
  hidden = jnp.arange(len(ex.input_ids), dtype=jnp.float32)[None, :, None]
  assert gather_img_window(hidden, jnp.asarray(start))[0, :, 0].tolist() == list(range(img0 - 1, img0 + 7))
  assert tok.decode(answer) == EXPRESSIVE


def test_truncation_keeps_img_tokens(tok):
  full = training_example(tok, "make it blue", EXPRESSIVE * 5, num_image_tokens=4, max_length=1024)
  ex = training_example(tok, "make it blue", EXPRESSIVE * 5, num_image_tokens=4,
                        max_length=len(full.input_ids) - 10)
  assert ex.truncated and len(ex.input_ids) == len(full.input_ids) - 10
  assert ex.input_ids[-9:].tolist() == list(range(403, 411)) + [2]
  with pytest.raises(ValueError, match="prompt alone"):
    training_example(tok, "make it blue", EXPRESSIVE, num_image_tokens=256, max_length=64)


def test_plain_text_agrees_with_transformers_tokenizer(tok, sp_dir):
  hf = transformers.LlamaTokenizer.from_pretrained(sp_dir)
  for text in ("make it blue", EXPRESSIVE, "what will this image be like if 'remove the sky'"):
    assert tok.encode(text, add_bos=False) == hf(text, add_special_tokens=False).input_ids


def test_window_missing_and_padding(tok):
  ids, mask = pad_batch([[5, 6, 403, 404], [7]], 6, pad_id=0, side="left")
  assert ids.tolist() == [[0, 0, 5, 6, 403, 404], [0, 0, 0, 0, 0, 7]]
  assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]]
  assert img_window_start(ids, 403).tolist() == [3, -1]
  with pytest.raises(ValueError, match="sequence 0 has 4 tokens"):
    pad_batch([[1, 2, 3, 4]], 3, pad_id=0)


def test_sample_grid_captions_wrap_to_the_row_and_keep_every_word():
  from PIL import Image, ImageDraw
  from mgie_jax.inference.pipeline import sample_grid, wrap_text
  draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  text = "expressive: the background becomes white so that the square stands out, " + "x" * 90
  lines = wrap_text(draw, text, 120)
  assert len(lines) > 2 and all(draw.textlength(l) <= 120 for l in lines)
  assert "".join(lines).replace(" ", "") == text.replace(" ", "")
  tile = np.zeros((8, 8, 3), np.uint8)
  short, long = sample_grid([tile], [tile], ["ok"], ["a"]), sample_grid([tile], [tile], [text], ["a"])
  assert long.size[0] == short.size[0] and long.size[1] > short.size[1]     # taller rows, not cut text
