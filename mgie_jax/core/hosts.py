"""Agreement between the hosts of one job: `max_of` a value, a `barrier`.

They go through the distributed runtime's key-value store, not through a device program: a small
all-gather that does not read the train step's outputs can run beside the step's collectives on
some devices and not others, and CPU collectives then abort ("collective mismatch"). The store
adds no device work and waits as long as a host needs (a save, a sample, a compile).
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

_AGREE_TIMEOUT_MS = 60 * 60 * 1000
_agreements: dict[str, int] = {}


def _round(what: str):
  """The distributed client (public through Orbax) and this call's unique name: every host counts
  its calls per `what`."""
  n = _agreements[what] = _agreements.get(what, -1) + 1
  return ocp.multihost.get_jax_distributed_client(), n, f"mgie_jax/{what}/{n}"


def max_of(value: int, what: str) -> int:
  """The largest `value` any host passed; every host calls it at the same point, with the same
  `what`. A single process returns `value`."""
  if jax.process_count() == 1:
    return int(value)
  client, n, here = _round(what)
  client.key_value_set(f"{here}/{jax.process_index()}", str(int(value)))
  client.wait_at_barrier(here, _AGREE_TIMEOUT_MS)
  values = [int(v) for _, v in client.key_value_dir_get(here + "/")]
  if n:     # every host is past this barrier, so past reading the previous round: drop our entry
    client.key_value_delete(f"mgie_jax/{what}/{n - 1}/{jax.process_index()}")
  return max(values)


def barrier(what: str) -> None:
  """Wait until every host gets here (minutes if need be: a host may still be compiling or
  writing); no device program, so it cannot interleave with one."""
  if jax.process_count() > 1:
    client, _, here = _round(what)
    client.wait_at_barrier(here, _AGREE_TIMEOUT_MS)
