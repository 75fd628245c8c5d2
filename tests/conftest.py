"""Test set-up: 4 fake CPU devices before jax is imported, so every multi-device path runs on a laptop; one JAX
compilation cache per test session (shared by the pytest-xdist workers and the experiment subprocesses they start),
so a program compiled by one test is not compiled again by the next: tests share compiles, never results.

The suite's programs are tiny, so compiling them costs more than running them: XLA's CPU backend compiles them
without LLVM optimisation (--xla_backend_optimization_level=0; the HLO passes, fusion included, still run, so
every program computes what it computes at the default level, only its machine code is slower). Set the flag in
XLA_FLAGS yourself (e.g. =2) to run the suite with optimised code."""
import os
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_session = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rlhf_jax_tests_jax_cache",
                                                                _session))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
