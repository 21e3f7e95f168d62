"""What the compiler says about a compiled program: its memory per device, FLOPs and XLA's
cost-model time (libtpu's; other backends give none). Shared by the train-step and edit AOT compiles."""

from __future__ import annotations

# Custom calls that libtpu's cost model prices at -1 s each (found by compiling single ops).
UNCOSTED_CALLS = ("ConcatBitcast", "ZeroCrop")


def compiler_numbers(compiled) -> dict:
  """flops; argument/output/alias/temp/code_gib where the backend analyses memory; and
  cost_model_raw_s, uncosted_ops and cost_model_s (the raw time with those -1 s added back) where
  it has a cost model."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  out = {"flops": float(cost.get("flops", 0.0))}
  mem = compiled.memory_analysis()
  if mem is not None:
    gib = 2.0 ** 30
    out.update(argument_gib=mem.argument_size_in_bytes / gib, output_gib=mem.output_size_in_bytes / gib,
               alias_gib=mem.alias_size_in_bytes / gib, temp_gib=mem.temp_size_in_bytes / gib,
               code_gib=mem.generated_code_size_in_bytes / gib)
  if "optimal_seconds" in cost:
    text = compiled.as_text() or ""
    uncosted = sum(text.count(f'custom_call_target="{t}"') for t in UNCOSTED_CALLS)
    out.update(cost_model_raw_s=float(cost["optimal_seconds"]), uncosted_ops=uncosted,
               cost_model_s=float(cost["optimal_seconds"]) + uncosted)
  return out
