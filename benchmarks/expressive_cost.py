"""Roofline estimate of the whole IPr2Pr expressive-instruction annotation on a TPU slice
(data_pipelines.expressive: LLaVA-7B v1 + CLIP-L/14 answers, Flan-T5-XXL beam-search summaries).

  python benchmarks/expressive_cost.py [--slice v5p-8 --examples 1000000 --batch 64 --answer_tokens 50]

A model, not a measurement: each decode step costs max(compute at --mfu of the chip's bf16 peak,
HBM traffic of the weights and the KV cache at the chip's bandwidth); prefill and encoder passes are
compute-bound. Weights are replicated per chip (bf16: 13.5 GB + 22 GB fit one v5p/v4 chip), the
batch is split over chips, hosts work independently. Parameter counts come from the real configs.
"""

import argparse

from mgie_jax.models.llama import LlamaConfig
from mgie_jax.models.t5 import T5Config

CHIPS = {  # bf16 peak TFLOP/s, HBM TB/s, HBM GiB per chip
    "v4": (275, 1.2, 32), "v5p": (459, 2.76, 95), "v5e": (197, 0.82, 16), "v6e": (918, 1.64, 32)}


def llama_params(c: LlamaConfig) -> int:
  d, f, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
  return layers * (4 * d * d + 3 * d * f + 2 * d) + 2 * c.vocab_size * d


def t5_params(c: T5Config) -> tuple[int, int]:
  d, f, inner = c.d_model, c.d_ff, c.num_heads * c.d_kv
  enc = c.num_layers * (4 * d * inner + 3 * d * f)
  dec = c.num_decoder_layers * (8 * d * inner + 3 * d * f) + c.vocab_size * d   # + head
  return enc, dec


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--slice", default="v5p-8")
  p.add_argument("--examples", type=int, default=1_000_000, help="IPr2Pr seed pairs (~1M in MGIE's use)")
  p.add_argument("--batch", type=int, default=64, help="examples per chip per step")
  p.add_argument("--prompt_tokens", type=int, default=330, help="system + question + 258 image tokens")
  p.add_argument("--answer_tokens", type=int, default=50, help="LLaVA tokens until two sentences are decided")
  p.add_argument("--full_answer_tokens", type=int, default=150, help="LLaVA tokens to </s> (no early stop)")
  p.add_argument("--summary_in", type=int, default=80, help="T5 input tokens (prompt + two sentences)")
  p.add_argument("--summary_out", type=int, default=40, help="T5 decode steps (max_length 64)")
  p.add_argument("--beams", type=int, default=5)
  p.add_argument("--mfu", type=float, default=0.5, help="achieved share of peak on the compute-bound parts")
  a = p.parse_args()

  chip, chips = a.slice.split("-")[0], int(a.slice.split("-")[1])
  chips = chips // 2 if chip in ("v4", "v5p") else chips        # v4/v5p names count TensorCores
  peak, bw, _ = CHIPS[chip]
  flops_s, bytes_s = peak * 1e12 * a.mfu, bw * 1e12

  llama = LlamaConfig()                                            # Vicuna-7B: LLaVA-7B v1's LLM
  n_llm = llama_params(llama)
  n_clip = 303_000_000                                             # CLIP ViT-L/14 vision tower
  kv_per_token = 2 * llama.num_hidden_layers * llama.hidden_size * 2   # bytes, bf16
  t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
  n_enc, n_dec = t5_params(t5)

  def llava_seconds(answer):
    prefill = a.batch * (2 * n_llm * a.prompt_tokens + 2 * n_clip * 257) / flops_s
    step = 0.0
    for i in range(answer):
      kv = a.batch * (a.prompt_tokens + i) * kv_per_token
      step += max(2 * n_llm * a.batch / flops_s, (2 * n_llm + kv) / bytes_s)
    return prefill + step

  rows = a.batch * a.beams
  t5_encode = a.batch * 2 * n_enc * a.summary_in / flops_s
  t5_kv = lambda i: rows * (i + a.summary_in) * 2 * t5.num_decoder_layers * t5.d_model * 2
  t5_decode = sum(max(2 * n_dec * rows / flops_s, (2 * n_dec + t5_kv(i)) / bytes_s) for i in range(a.summary_out))
  t5_seconds = t5_encode + t5_decode

  steps = a.examples / (a.batch * chips)
  llava_flop = a.examples * (2 * n_llm * (a.prompt_tokens + a.answer_tokens) + 2 * n_clip * 257)
  t5_flop = a.examples * (2 * n_enc * a.summary_in + 2 * n_dec * a.beams * a.summary_out)
  print(f"slice {a.slice}: {chips} chips, {peak} TFLOP/s bf16 and {bw} TB/s each, mfu {a.mfu}")
  print(f"params: LLaMA {n_llm / 1e9:.2f}B + CLIP {n_clip / 1e9:.2f}B, T5 encoder {n_enc / 1e9:.2f}B "
        f"+ decoder {n_dec / 1e9:.2f}B")
  print(f"FLOP for {a.examples:,} examples: LLaVA {llava_flop:.2e}, summariser {t5_flop:.2e}")
  for name, answer in (("early stop", a.answer_tokens), ("decode to </s>", a.full_answer_tokens)):
    per = llava_seconds(answer) + t5_seconds
    hours = steps * per / 3600
    print(f"{name:15s} per {a.batch}-example step per chip: LLaVA {llava_seconds(answer):.2f} s + "
          f"summary {t5_seconds:.2f} s -> {hours:.1f} h on {a.slice} ({hours * chips:.0f} chip-hours)")


if __name__ == "__main__":
  main()
