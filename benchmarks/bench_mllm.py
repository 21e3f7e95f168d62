"""Time our jit-compiled MLLM forward and greedy decode against the PyTorch originals on CPU.

  python benchmarks/bench_mllm.py [--layers 4 --width 512 --batch 2 --seq 256 --new 32]

Both sides load the same random weights (saved by transformers, read by our loader) and
run in fp32. Prints median wall time per call and the ratio torch / ours (>1: we are faster).
"""

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from common import machine, table, timeit

from mgie_jax.inference.greedy import greedy_generate
from mgie_jax.models import ClipVisionModel, LlamaForCausalLM
from mgie_jax.convert import from_pretrained


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--new", type=int, default=32)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  torch.manual_seed(0)
  heads = a.width // 64
  rows = []
  with tempfile.TemporaryDirectory() as d:
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32011, hidden_size=a.width, intermediate_size=a.width * 11 // 4,
        num_hidden_layers=a.layers, num_attention_heads=heads, num_key_value_heads=heads,
        pad_token_id=0)).eval()
    llama.save_pretrained(os.path.join(d, "llama"))
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=a.width, intermediate_size=a.width * 4, num_hidden_layers=a.layers,
        num_attention_heads=heads, image_size=224, patch_size=14)).eval()
    clip.save_pretrained(os.path.join(d, "clip"))
    ours = from_pretrained(LlamaForCausalLM, os.path.join(d, "llama"))
    ours_clip = from_pretrained(ClipVisionModel, os.path.join(d, "clip"))

  ids = np.random.default_rng(0).integers(3, 32000, (a.batch, a.seq))
  tids = torch.as_tensor(ids)
  graphdef, state = nnx.split(ours)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits)
  with torch.inference_mode():
    t_torch = timeit(lambda: llama(input_ids=tids).logits, a.repeats)
  t_ours = timeit(lambda: fwd(state, jnp.asarray(ids)).block_until_ready(), a.repeats)
  rows.append(("LLaMA forward", t_torch, t_ours))

  px = np.random.default_rng(1).normal(size=(a.batch, 3, 224, 224)).astype(np.float32)
  cg, cs = nnx.split(ours_clip)
  cfwd = jax.jit(lambda s, x: nnx.merge(cg, s)(x).last_hidden_state)
  with torch.inference_mode():
    t_torch = timeit(lambda: clip(pixel_values=torch.as_tensor(px)).last_hidden_state, a.repeats)
  t_ours = timeit(lambda: cfwd(cs, jnp.asarray(px.transpose(0, 2, 3, 1))).block_until_ready(), a.repeats)
  rows.append(("CLIP forward", t_torch, t_ours))

  prompt = ids[:, :64]
  with torch.inference_mode():
    t_torch = timeit(lambda: llama.generate(
        input_ids=torch.as_tensor(prompt), do_sample=False, max_new_tokens=a.new,
        min_new_tokens=a.new, no_repeat_ngram_size=3, pad_token_id=0), max(1, a.repeats // 2))
  t_ours = timeit(lambda: greedy_generate(ours, prompt, max_new_tokens=a.new, no_repeat_ngram_size=3,
                                          eos_id=-1).sequences.block_until_ready(),
                  max(1, a.repeats // 2))
  rows.append((f"greedy decode ({a.new} tokens, prompt 64)", t_torch, t_ours))

  print(machine())
  print(f"config: {a.layers} layers, width {a.width}, batch {a.batch}, seq {a.seq}, fp32")
  table(rows)


if __name__ == "__main__":
  main()
