"""Tiny random LLaVA v1 + Flan-T5 folders and a small IPr2Pr release for the annotation tests."""

import json
import os
import shutil

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

from conftest import TINY_CLIP, TINY_LLAMA

T5_WORDS = ("the image will be brighter and the circle is red blue green square triangle sky "
            "summarize following paragraph in 32 words a an of to this with more less").split()


def make_llava_v1(root, clip_path, sp_dir, *, seed=0, dot_boost=3.0, eos_boost=1.0):
  """LLaVA v1 folder (CLIP found through mm_vision_tower); '.' and </s> made likely so that
  answers reach two sentences or end within a few dozen tokens."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "tokenizer.model"))
  vocab = sp.get_piece_size() + 3                    # <im_patch>, <im_start>, <im_end>
  torch.manual_seed(seed)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA, "vocab_size": vocab})).eval()
  sd = {k: v.detach().clone().contiguous() for k, v in llama.state_dict().items()}
  dot = sp.piece_to_id(".")
  sd["lm_head.weight"][dot] *= dot_boost
  sd["lm_head.weight"][2] *= eos_boost
  sd["model.mm_projector.weight"] = torch.randn(TINY_LLAMA["hidden_size"], TINY_CLIP["hidden_size"]) * 0.2
  sd["model.mm_projector.bias"] = torch.zeros(TINY_LLAMA["hidden_size"])
  os.makedirs(root, exist_ok=True)
  save_file(sd, os.path.join(root, "model.safetensors"))
  with open(os.path.join(root, "config.json"), "w") as f:
    json.dump({**llama.config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
               "mm_vision_tower": clip_path, "mm_hidden_size": TINY_CLIP["hidden_size"],
               "mm_vision_select_layer": -2, "mm_use_im_start_end": True,
               "im_patch_token": sp.get_piece_size()}, f)
  shutil.copy(os.path.join(sp_dir, "tokenizer.model"), root)
  return str(root)


def make_t5_tokenizer(root):
  import sentencepiece as spm
  rng = np.random.default_rng(0)
  sents = [" ".join(rng.choice(T5_WORDS, 8)) + str(rng.choice(list(".,:"))) for _ in range(2000)]
  os.makedirs(root, exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sents), model_prefix=os.path.join(root, "spiece"), vocab_size=64,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      normalization_rule_name="nmt_nfkc", hard_vocab_limit=False, minloglevel=2)
  return os.path.join(root, "spiece.model")


TINY_T5 = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16,
               feed_forward_proj="gated-gelu", decoder_start_token_id=0, dropout_rate=0.0)


def make_t5(root, *, seed=0, task_params=None, eos_boost=12.0, **overrides):
  """A tiny random T5 v1.1 folder with its SentencePiece model; the </s> row of the head is scaled
  so that beams finish at different lengths."""
  import sentencepiece as spm
  model_file = make_t5_tokenizer(root)
  vocab = spm.SentencePieceProcessor(model_file=model_file).get_piece_size()
  torch.manual_seed(seed)
  cfg = transformers.T5Config(vocab_size=vocab, **{**TINY_T5, **overrides},
                              task_specific_params={"summarization": task_params or {}})
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    model.lm_head.weight[1] *= eos_boost
  model.save_pretrained(root)
  return str(root), model
