"""Mapping table and `from_pretrained` for transformers `T5ForConditionalGeneration` folders
(T5 v1.1, Flan-T5 and their fine-tunes such as MGIE's summariser), safetensors or .bin."""

from __future__ import annotations

from flax import nnx

from mgie_jax.convert.mapping import LINEAR, Rule, load_module
from mgie_jax.convert.mllm import check_arch, runtime_kwargs
from mgie_jax.convert.torch_files import open_weights, read_config
from mgie_jax.models.t5 import T5Config, T5ForConditionalGeneration

T5_ARCHS = ("T5ForConditionalGeneration",)
# Tied copies of `shared.weight` that older checkpoints also store.
IGNORED = (r"^(encoder|decoder)\.embed_tokens\.weight$",)


def _attention(torch: str, ours: str) -> list[Rule]:
  return [Rule(f"{torch}.{p}.weight", f"{ours}.{p}.kernel", LINEAR) for p in ("q", "k", "v", "o")]


def _feed_forward(cfg: T5Config, torch: str, ours: str) -> list[Rule]:
  names = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
  return [Rule(f"{torch}.DenseReluDense.{p}.weight", f"{ours}.{p}.kernel", LINEAR) for p in names]


def t5_rules(cfg: T5Config) -> list[Rule]:
  enc, dec = "encoder.block.{i}.layer", "decoder.block.{i}.layer"
  rules = [Rule("shared.weight", "shared.embedding"),
           Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                "encoder.relative_bias.embedding"),
           Rule("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                "decoder.relative_bias.embedding"),
           Rule("encoder.final_layer_norm.weight", "encoder.final_norm.weight"),
           Rule("decoder.final_layer_norm.weight", "decoder.final_norm.weight"),
           Rule(f"{enc}.0.layer_norm.weight", "encoder.layers.self_norm.weight"),
           Rule(f"{enc}.1.layer_norm.weight", "encoder.layers.ff_norm.weight"),
           Rule(f"{dec}.0.layer_norm.weight", "decoder.layers.self_norm.weight"),
           Rule(f"{dec}.1.layer_norm.weight", "decoder.layers.cross_norm.weight"),
           Rule(f"{dec}.2.layer_norm.weight", "decoder.layers.ff_norm.weight")]
  rules += _attention(f"{enc}.0.SelfAttention", "encoder.layers.self_attn")
  rules += _feed_forward(cfg, f"{enc}.1", "encoder.layers.ff")
  rules += _attention(f"{dec}.0.SelfAttention", "decoder.layers.self_attn")
  rules += _attention(f"{dec}.1.EncDecAttention", "decoder.layers.cross_attn")
  rules += _feed_forward(cfg, f"{dec}.2", "decoder.layers.ff")
  if not cfg.tie_word_embeddings:
    rules.append(Rule("lm_head.weight", "lm_head.kernel", LINEAR))
  return rules


def t5_config(path: str, **runtime) -> T5Config:
  hf = read_config(path)
  check_arch(path, hf, T5_ARCHS)
  return T5Config.from_hf(hf, **runtime)


def t5_from_pretrained(path: str, dtype=None, **runtime) -> T5ForConditionalGeneration:
  tensors = open_weights(path)
  # A checkpoint that stores lm_head.weight has its own head (v1.1 / Flan-T5; transformers 5 also
  # writes the tied copy); one without it uses the embedding.
  tied = "lm_head.weight" not in set(tensors)
  cfg = t5_config(path, **runtime_kwargs(dtype, {**runtime, "tie_word_embeddings": tied}))
  return load_module(lambda: T5ForConditionalGeneration(cfg, rngs=nnx.Rngs(0)), tensors,
                     t5_rules(cfg), source=path, ignore=IGNORED)
