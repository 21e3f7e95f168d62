"""Which JAX platforms to start when the user has not said (JAX_PLATFORMS unset).

libtpu from PyPI (`.[tpu]`, `.[test]`) is the TPU compiler `mgie_jax.compile` uses on any machine;
installed, it also makes JAX try a TPU at start-up, and on a machine without one libtpu prints
about six lines of errors before JAX falls back. We look for TPU chips the way JAX itself does
(a PCI device of Google's vendor id, 0x1ae0, in /sys/bus/pci/devices) and, finding none, name
the platforms this machine has (GPU when its plugin and driver are present, then CPU), so the
TPU client is never started. With a TPU present, or JAX_PLATFORMS / jax_platforms set, nothing
changes; compiling for a TPU topology (`jax.experimental.topologies`) does not need the client.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_chips(sysfs: str = "/sys/bus/pci/devices") -> int:
  n = 0
  for vendor in glob.glob(os.path.join(sysfs, "*", "vendor")):
    try:
      with open(vendor) as f:
        n += f.read().strip() == GOOGLE_PCI_VENDOR
    except OSError:
      continue
  return n


def _installed(*modules: str) -> bool:
  for m in modules:
    try:
      if importlib.util.find_spec(m) is not None:
        return True
    except (ImportError, ValueError):
      continue
  return False


def platforms_without_tpu() -> str:
  """The platform list for a machine with no TPU: cuda / rocm where plugin and device exist, cpu."""
  out = []
  if _installed("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13") \
      and os.path.exists("/dev/nvidiactl"):
    out.append("cuda")
  if _installed("jax_rocm7_plugin", "jax_rocm60_plugin", "jax_plugins.xla_rocm7", "jax_plugins.xla_rocm60") \
      and os.path.exists("/dev/kfd"):
    out.append("rocm")
  return ",".join(out + ["cpu"])


def skip_absent_tpu(environ=os.environ) -> str | None:
  """Set jax_platforms to skip the TPU client on a machine without TPU chips where libtpu is
  installed and the user chose nothing; returns what was set (None: nothing changed)."""
  if environ.get("JAX_PLATFORMS") or environ.get("JAX_FORCE_TPU_INIT") or not _installed("libtpu"):
    return None
  if tpu_chips():
    return None
  value = platforms_without_tpu()
  jax = sys.modules.get("jax")
  if jax is None:          # JAX reads JAX_PLATFORMS when imported; importing it here would cost
    environ["JAX_PLATFORMS"] = value     # JAX-free users of this package (mgie_jax.inference.pytorch_pipeline)
  elif not jax.config.jax_platforms:
    jax.config.update("jax_platforms", value)
  return value
