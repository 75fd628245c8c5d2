"""Host-process memory setting for XLA:CPU runs: glibc malloc keeps freed memory for reuse.

XLA:CPU allocates each compiled call's temporary buffer anew (1.07 GB for the GPT-2 D=256 pretraining step of
BENCHMARKS.md), and glibc hands an allocation that large to mmap from a thread's arena and back to the kernel on
free. So every step faults ~280k fresh pages in again: 0.45 s of kernel time and ~20% of that step's wall time
on the project machine (1.60-1.65 s vs 1.30-1.33 s). `keep_freed_memory` sets one malloc arena, no mmap'd
chunks and a 2 GiB trim threshold: after the first steps, a step faults no page at all. The price is a resident
size that stays at its peak, and one arena lock for every thread.

It must run before jax creates its CPU client: XLA's worker threads pick their malloc arena at their first
allocation, and mallopt does not move a thread that already has one.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameter numbers (malloc.h)


def cpu_only() -> bool:
  """True when jax will run on the CPU: JAX_PLATFORMS is cpu, or unset with no accelerator plugin installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  has_plugin = (bool(importlib.metadata.entry_points(group="jax_plugins"))
                or importlib.util.find_spec("jax_plugins") is not None or importlib.util.find_spec("libtpu") is not None)
  return not has_plugin


def keep_freed_memory() -> bool:
  """mallopt(M_ARENA_MAX=1, M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB - 1) on glibc; False (nothing set) elsewhere."""
  name = ctypes.util.find_library("c")
  if name is None:
    return False
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl, macOS): no mallopt
    return False
  return all(mallopt(param, value) == 1
             for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
