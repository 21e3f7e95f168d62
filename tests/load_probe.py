"""Load a pretrained folder set (configs/ipr2pr.py) onto an fsdp mesh of 8 CPU devices and print,
as JSON, what every device holds, the most any device held while loading, and host memory.

  python tests/load_probe.py '{"llava": DIR, "sd": DIR, "edit_head": {...}}'
"""

import json
import resource
import sys

import jax
import numpy as np


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
  """VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's over exec)."""
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))


def per_device(arrays) -> dict:
  out = {}
  for a in arrays:
    for s in a.addressable_shards:
      out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
  return out


def main():
  args = json.loads(sys.argv[1])
  from configs import ipr2pr
  from mgie_jax.core import parallel
  from mgie_jax.training.setup import make_setup
  c = ipr2pr.get_config()
  c.model.remat = "none"
  c.model.edit_head = args["edit_head"]
  c.model.noise = {}
  c.pretrained.update(llava=args["llava"], sd=args["sd"])
  c.data.tokenizer = args["llava"]
  c.mesh = dict(data=1, fsdp=8, tensor=1)
  run = make_setup(c, c.data.tokenizer)
  placed, peak, full_copies, largest, rss_trace = [], {}, [], 0, []
  original = parallel.place

  def watched(read, shape, dtype, sharding):
    nonlocal largest
    out = original(read, shape, dtype, sharding)
    placed.append(out)
    largest = max(largest, out.nbytes)
    if out.nbytes >= 1 << 20 and any(s.data.nbytes == out.nbytes for s in out.addressable_shards):
      full_copies.append(list(shape))
    rss_trace.append(rss_bytes())
    for d, b in per_device(jax.live_arrays()).items():
      peak[d] = max(peak.get(d, 0), b)
    return out

  parallel.place = watched
  before = rss_bytes()
  state, frozen = run.new_state()
  jax.block_until_ready((state, frozen))
  after = rss_bytes()
  live = per_device(jax.live_arrays())
  model_bytes = sum(a.nbytes for a in jax.tree.leaves((state.params, frozen)))
  parameters = sum(a.size for a in jax.tree.leaves((state.params, frozen)))
  print(json.dumps({"devices": len(jax.devices()), "per_device": live, "peak_per_device": peak,
                    "placed": len(placed), "full_copies": full_copies, "largest_tensor": largest,
                    "model_bytes": model_bytes, "parameters": parameters, "state_bytes": sum(live.values()),
                    "rss_before": before, "rss_while_placing": max(rss_trace), "rss_after": after,
                    "max_rss": peak_rss_bytes()}))


if __name__ == "__main__":
  main()
