"""Test set-up: 4 fake CPU devices before jax is imported, so every multi-device path runs on a laptop; one JAX
compilation cache per test session (shared by the pytest-xdist workers and the experiment subprocesses they start),
so a program compiled by one test is not compiled again by the next: tests share compiles, never results."""
import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_session = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rlhf_jax_tests_jax_cache",
                                                                _session))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
