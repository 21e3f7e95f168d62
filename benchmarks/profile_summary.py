"""Where a compiled step's time goes: a JAX profile's per-instruction times summed per tower and
per op class.

The profile (`jax.profiler.trace(..., create_perfetto_trace=True)`) names each executed HLO
instruction; the compiled program's text (`compiled.as_text()`) gives each instruction its opcode,
what a fusion computes, and its `op_name`, which carries the model's named scopes (clip,
projector, embed_tokens, decoder, lm_head, edit_head, vae, unet, optimizer) and, for backward
ops, JAX's `transpose(...)`. Container instructions (while, call, conditional) are left out so
that loop bodies are not counted twice. Times are summed over threads: shares of thunk time,
not of wall time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

SCOPES = ("clip", "projector", "embed_tokens", "decoder", "lm_head", "edit_head", "vae", "unet", "optimizer")
CONTAINERS = {"while", "call", "conditional", "async-start", "async-done"}
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def index_hlo(text: str) -> dict:
  """name -> {opcode, op_name, opcodes inside (for fusions)} for every instruction in `text`."""
  body = collections.defaultdict(set)
  out, current = {}, None
  for line in text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      name, opcode = m.groups()
      body[current].add(opcode)
      calls = _CALLS.search(line)
      op = _OP_NAME.search(line)
      out[name] = {"opcode": opcode, "op_name": op.group(1) if op else "", "calls": calls.group(1) if calls else None}
      continue
    m = _COMPUTATION.match(line)
    if m and "=" not in line.split("{")[0]:
      current = m.group(1)
  for ins in out.values():
    ins["inside"] = body.get(ins["calls"], set()) if ins["calls"] else {ins["opcode"]}
  return out


def op_class(ins: dict) -> str:
  inside = ins["inside"]
  for opcodes, name in ((("convolution",), "convolution"), (("dot",), "matmul"), (("scatter",), "scatter"),
                        (("gather", "dynamic-slice"), "gather"), (("reduce", "reduce-window"), "reduction"),
                        (("copy", "transpose"), "copy/transpose")):
    if inside & set(opcodes):
      return name
  if ins["opcode"] == "custom-call":
    return "custom call"
  return "elementwise"


def tower(op_name: str) -> str:
  """The innermost named scope of `op_name`, with ' (backward)' for transposed ops."""
  found = [s for s in SCOPES if re.search(rf"(^|[/(]){s}($|[/)])", op_name)]
  where = max(found, key=lambda s: op_name.rfind(s)) if found else "other"
  return where + (" (backward)" if "transpose(" in op_name and where != "optimizer" else "")


def thunk_times(trace_dir: str) -> dict[str, float]:
  """Microseconds per event name, summed over threads, from the newest perfetto trace in `trace_dir`."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(paths[-1]) as f:
    events = json.load(f)["traceEvents"]
  out = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      out[e["name"]] += float(e["dur"])
  return out


def summarize(trace_dir: str, hlo_text: str) -> tuple[list, list]:
  """(rows per tower, rows per op class): (name, milliseconds, share) sorted by time."""
  hlo = index_hlo(hlo_text)
  towers, classes = collections.Counter(), collections.Counter()
  for name, us in thunk_times(trace_dir).items():
    ins = hlo.get(name)
    if ins is None or ins["opcode"] in CONTAINERS:
      continue
    towers[tower(ins["op_name"])] += us
    classes[op_class(ins)] += us
  total = sum(towers.values()) or 1.0
  rows = lambda c: [(k, v / 1e3, v / total) for k, v in c.most_common()]
  return rows(towers), rows(classes)


def print_summary(trace_dir: str, hlo_text: str, title: str = "our step") -> None:
  towers, classes = summarize(trace_dir, hlo_text)
  for what, rows in (("tower", towers), ("op class", classes)):
    print(f"{title}, per {what} (thunk time summed over threads):")
    for name, ms, share in rows:
      if share >= 0.005:
        print(f"  {name:32s} {ms:10.1f} ms {100 * share:5.1f}%")
