"""Mapping tables for MGIE's own weights: the edit head (`edit_head.*` of the released `mllm.pt`)."""

from __future__ import annotations

import re

from flax import nnx

from mgie_jax.convert.mapping import IDENTITY, LINEAR, Rule, load_module, plan_module, prefixed
from mgie_jax.convert.mllm import linear_rules, norm_rules
from mgie_jax.convert.torch_files import open_weights
from mgie_jax.models.edit_head import EditHead, EditHeadConfig


def _attention(torch: str, ours: str) -> list[Rule]:
  # nn.MultiheadAttention packs q, k, v as rows of in_proj_weight [3d, d]; we keep them packed.
  return [Rule(f"{torch}.in_proj_weight", f"{ours}.in_proj.kernel", LINEAR),
          Rule(f"{torch}.in_proj_bias", f"{ours}.in_proj.bias"),
          *linear_rules(f"{torch}.out_proj", f"{ours}.out_proj")]


def edit_head_rules(cfg: EditHeadConfig) -> list[Rule]:
  """The official EditMapper's state dict (llm2hid, query, mapper.*, hid2feat) -> EditHead."""
  rules = [*linear_rules("llm2hid", "llm2hid"), Rule("query", "query", IDENTITY),
           *linear_rules("hid2feat", "hid2feat"),
           *norm_rules("mapper.encoder.norm", "encoder_norm"), *norm_rules("mapper.decoder.norm", "decoder_norm")]
  for kind, n, norms in (("encoder", cfg.encoder_layers, 2), ("decoder", cfg.decoder_layers, 3)):
    for i in range(n):
      t, o = f"mapper.{kind}.layers.{i}", f"{kind}_layers.{i}"
      rules += _attention(f"{t}.self_attn", f"{o}.self_attn")
      if kind == "decoder":
        rules += _attention(f"{t}.multihead_attn", f"{o}.multihead_attn")
      rules += linear_rules(f"{t}.linear1", f"{o}.linear1") + linear_rules(f"{t}.linear2", f"{o}.linear2")
      for k in range(1, norms + 1):
        rules += norm_rules(f"{t}.norm{k}", f"{o}.norm{k}")
  return rules


def edit_head_plan(tensors, cfg: EditHeadConfig, prefix: str = "edit_head.", source: str = "state dict"):
  """The edit head's ModulePlan over a mapping of tensors (MGIE's `mllm.pt`: keys `edit_head.*`)."""
  ignore = (rf"^(?!{re.escape(prefix)})",) if prefix else ()     # keys outside the edit head
  return plan_module(lambda: EditHead(cfg, rngs=nnx.Rngs(0)), tensors, prefixed(edit_head_rules(cfg), prefix, ""),
                     source=source, ignore=ignore)


def edit_head_from_state_dict(path_or_tensors, cfg: EditHeadConfig = EditHeadConfig(),
                              prefix: str = "edit_head.") -> EditHead:
  """Load the edit head from MGIE's `mllm.pt` (keys `edit_head.*`) or any mapping of tensors.

  Other keys of the file (embed_tokens, lm_head, emb) are left for the LLaVA loader.
  """
  tensors = open_weights(path_or_tensors) if isinstance(path_or_tensors, str) else path_or_tensors
  source = path_or_tensors if isinstance(path_or_tensors, str) else "state dict"
  ignore = (rf"^(?!{re.escape(prefix)})",) if prefix else ()     # keys outside the edit head
  return load_module(lambda: EditHead(cfg, rngs=nnx.Rngs(0)), tensors,
                     prefixed(edit_head_rules(cfg), prefix, ""), source=source, ignore=ignore)
