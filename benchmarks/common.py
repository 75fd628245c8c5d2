"""Shared benchmark plumbing: thread pinning, interleaved median timing, machine load, matmul peak, HF copies.

Import this module before jax or torch (it pins the process to `BENCH_THREADS` CPUs, default 2, so that
XLA's CPU client, which sizes its intra-op pool to the schedulable CPUs, and torch.set_num_threads use the
same number of threads). Everything runs in float32.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Callable

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:THREADS])
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("MKL_NUM_THREADS", str(THREADS))
# torch's OpenMP threads otherwise spin at barriers; on a shared, oversubscribed CPU a spinning thread waiting for
# a descheduled one made HF generate 5-15x slower here with 2 threads. PASSIVE makes them sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every HF model comes from a local directory

from rlhf_jax import host  # noqa: E402  (imports no jax)

# BENCH_KEEP_MEMORY=1: glibc keeps freed memory (rlhf_jax/host.py, what our experiments do on CPU) for both sides,
# set before jax's client and torch's threads exist. Off by default: the peers then run as their users run them,
# and the figures stay comparable with the earlier ones (BENCHMARKS.md gives both settings)
KEEP_MEMORY = os.environ.get("BENCH_KEEP_MEMORY", "0") == "1" and host.keep_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import hf_import, model  # noqa: E402


def torch_setup():
  """Imports torch with THREADS intra-op threads and one inter-op thread; returns the module."""
  import torch
  torch.set_num_threads(THREADS)
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:  # already set in this process
    pass
  return torch


def load() -> str:
  """The 1/5/15-minute load averages (the CPU is shared with other jobs): note them next to every figure."""
  return "load %.2f %.2f %.2f" % os.getloadavg()


def header(title: str) -> None:
  """Prints the benchmark's title, the threads, jax/devices and the machine load."""
  print(f"== {title}")
  print(f"threads {THREADS} (affinity {sorted(os.sched_getaffinity(0))}), jax {jax.__version__} {jax.devices()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"malloc keeps freed memory {KEEP_MEMORY}, {load()}",
        flush=True)


def timed(fn: Callable[[], object]) -> float:
  """Wall seconds of one call (fn must block until its result is ready)."""
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """Runs every fn `warmup` times, then `reps` rounds of one call each, alternating (AB, BA, ...) so that load
  drift hits all sides alike. Returns (wall seconds, process CPU seconds) per side: on a shared, oversubscribed
  CPU the CPU time (all of this process's threads) is the steadier measure of the work done. Compile time
  belongs in warmup, not here."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  wall: dict[str, list[float]] = {name: [] for name in fns}
  cpu: dict[str, list[float]] = {name: [] for name in fns}
  for r in range(reps):
    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
      c0, t0 = time.process_time(), time.perf_counter()
      fns[name]()
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  return wall, cpu


def med(xs: list[float]) -> float:
  return statistics.median(xs)


def spread(xs: list[float]) -> str:
  """'median s (min-max, n)' for a list of seconds."""
  return f"{med(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def matmul_peak(n: int = 2048, reps: int = 7) -> dict[str, float]:
  """Measured float32 matmul FLOP/s of an n×n×n product: jnp.dot under jit, and torch.mm when torch is loaded."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(jnp.dot)
  out = {"jax": 2 * n ** 3 / med([timed(lambda: f(x, x).block_until_ready()) for _ in range(reps + 1)][1:])}
  try:
    import torch
  except ImportError:
    return out
  xt = torch.from_numpy(np.array(x))
  with torch.no_grad():
    out["torch"] = 2 * n ** 3 / med([timed(lambda: torch.mm(xt, xt)) for _ in range(reps + 1)][1:])
  return out


def gpt2_config(vocab: int = 8192, d_model: int = 256, layers: int = 6, heads: int = 8, max_len: int = 256,
                ) -> model.TransformerConfig:
  """GPT-2-shaped config (F = 4D, tied embeddings, float32)."""
  return model.TransformerConfig(vocab_size=vocab, d_model=d_model, num_heads=heads, num_kv_heads=heads,
                                 d_ff=4 * d_model, num_layers=layers, max_len=max_len, family="gpt2")


def hf_copy(cfg: model.TransformerConfig, params, attn: str = "sdpa"):
  """The same weights as a transformers GPT2LMHeadModel (through save_hf_checkpoint; float32, eval mode)."""
  import transformers
  directory = tempfile.mkdtemp(prefix="bench_hf_")
  hf_import.save_hf_checkpoint(cfg, params, directory)
  m = transformers.GPT2LMHeadModel.from_pretrained(  # no dropout: ours has none
      directory, attn_implementation=attn, torch_dtype=torch_setup().float32, resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0)
  return m.eval()


def train_flops(cfg: model.TransformerConfig, batch: int, seq: int) -> float:
  """FLOPs of one training step: 6·N·tokens (N = matmul params incl. the tied head) + 12·L·T·D per token
  for QKᵀ and PV (full T×T scores: forward 2·2·T·D, backward twice that), as in the PaLM appendix B."""
  D, L, F, V = cfg.d_model, cfg.num_layers, cfg.d_ff, cfg.vocab_size
  n_matmul = L * (4 * D * D + 2 * D * F) + D * V
  tokens = batch * seq
  return 6.0 * n_matmul * tokens + 12.0 * L * seq * D * tokens


def generation_args(ap) -> None:
  """The shape flags the sampling and PPO benchmarks share: batch, prompt length, new tokens, vocab."""
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--prompt", type=int, default=32)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--vocab", type=int, default=8192)


def fmt_rate(x: float) -> str:
  return f"{x / 1e9:.1f} GFLOP/s"
