"""Host memory setting: after keep_freed_memory a freed large buffer is reused (no page faults); cpu_only."""
import subprocess
import sys

import pytest

from rlhf_jax import host

# Faults of the second of two 256 MB allocations (each touched, then freed) on an XLA-like worker thread
_PROBE = """
import resource, sys, threading
import numpy as np
from rlhf_jax import host
np._core.multiarray._set_madvise_hugepage(False)  # 4 KiB pages, as XLA's buffers get
if sys.argv[1] == "keep":
  assert host.keep_freed_memory()
faults = []
def work():
  for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = np.ones(64 * 2 ** 20, np.float32)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
t = threading.Thread(target=work)
t.start()
t.join()
print(faults[1])
"""
PAGES = 256 * 2 ** 20 // 4096


def _second_allocation_faults(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
  return int(out.stdout.split()[-1])


def _pages_per_fault() -> int:
  """512 where the kernel backs every large mapping with 2 MiB pages (transparent hugepages 'always'), else 1."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return 512 if "[always]" in f.read() else 1
  except OSError:
    return 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_reuses_a_freed_large_buffer():
  pages = PAGES // _pages_per_fault()
  assert _second_allocation_faults("default") > pages // 2  # glibc: mmap'd, returned, faulted in again
  assert _second_allocation_faults("keep") <= pages // 100  # kept in the one arena and reused


def test_cpu_only_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host.cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host.cpu_only()
  monkeypatch.delenv("JAX_PLATFORMS")
  assert host.cpu_only()  # this environment has no accelerator plugin
