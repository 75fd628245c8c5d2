"""Where the time goes: a jax.profiler trace (XLA:CPU per-op events) of our pretraining step, our KV-cache sampler
or one PPO iteration (generation + scoring + update) at the benchmark shapes, summed per compiled module and HLO
op kind (the op name without its ".N" suffix: dot / ynn_fusion = matmuls, loop_fusion = elementwise, ...).

Times are op-seconds per call: the sum of the durations of the per-op events of `--calls` traced calls (after a
warm-up call), divided by the calls. Ops on the two intra-op threads can overlap, so the total can exceed wall time.

Command: .venv-bench/bin/python -m benchmarks.profile_ops --what {pretrain,sample,greedy,ppo} [--top 12]
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
                           + " --xla_cpu_enable_xprof_traceme=true")  # per-op events in the trace

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from benchmarks import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import model, sampling  # noqa: E402


def op_times(fn, calls: int) -> tuple[dict, float]:
  """({(hlo module, op kind): (op-seconds per call, events per call)}, wall seconds per call) of traced calls."""
  fn()
  log_dir = tempfile.mkdtemp(prefix="bench_trace_")
  t0 = time.perf_counter()
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    for _ in range(calls):
      fn()
  wall = (time.perf_counter() - t0) / calls
  trace = json.load(gzip.open(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    args = e.get("args") or {}
    if e.get("ph") == "X" and "hlo_op" in args:
      for key in ((args.get("hlo_module", "?"), re.sub(r"\.\d+$", "", args["hlo_op"])),
                  (args.get("hlo_module", "?"), "=" + args["hlo_op"])):  # "=" marks a single op (not a kind)
        total[key] += e["dur"] * 1e-6
        count[key] += 1
  return {k: (total[k] / calls, count[k] / calls) for k in total}, wall


def print_table(times: dict, wall: float, top: int) -> None:
  """Per module, then the top op kinds overall, as op-seconds per call and share of all op-seconds."""
  kinds = {k: v for k, v in times.items() if not k[1].startswith("=")}
  everything = sum(t for t, _ in kinds.values())
  print(f"wall {wall:.3f} s per call; op-seconds {everything:.3f} per call; {common.load()}")
  modules = collections.Counter()
  for (module, _), (t, _) in kinds.items():
    modules[module] += t
  for module, t in modules.most_common():
    print(f"  module {module:40s} {t:8.3f} s  {t / everything:5.1%}")
  for title, table in (("op kinds", kinds), ("single ops", {k: v for k, v in times.items() if k not in kinds})):
    print(f"  top {top} {title}:")
    for (module, op), (t, n) in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]:
      print(f"    {t:8.3f} s {t / everything:6.1%}  {n:7.0f} events  {op.lstrip('='):36s} ({module})")


def sample_fn(greedy: bool):
  """One `sampling.sample` call: GPT-2 D=256 L=6, vocab 8192, batch 32, prompt 32 -> 64 tokens (no EOS)."""
  cfg = common.gpt2_config(max_len=96)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  prompts = np.random.default_rng(0).integers(0, cfg.vocab_size - 1, (32, 32)).astype(np.int32)
  return lambda: jax.block_until_ready(sampling.sample(
      params, cfg, prompts, np.ones_like(prompts), jax.random.PRNGKey(1), max_new_tokens=64, greedy=greedy,
      eos_id=cfg.vocab_size - 1, pad_id=0).tokens_BxT)


def pretrain_fn():
  """One pretraining step of benchmarks.pretrain_step (B=16, T=256)."""
  from benchmarks import pretrain_step
  cfg = common.gpt2_config()
  step, _ = pretrain_step.ours_step(cfg, model.init_params(cfg, jax.random.PRNGKey(0)),
                                    pretrain_step.lm_batch(cfg, 16, 256))
  return step


def ppo_fn():
  """One PPO iteration of benchmarks.ppo_iteration (32 prompts x 32 -> 64 tokens, 2 epochs x 2 minibatches)."""
  from benchmarks import ppo_iteration
  from rlhf_jax import stages
  cfg = common.gpt2_config(max_len=96)
  policy = model.init_params(cfg, jax.random.PRNGKey(0))
  reward = stages.fresh_reward_params(cfg, jax.random.PRNGKey(1), backbone=policy)
  prompts = np.random.default_rng(0).integers(2, cfg.vocab_size - 1, (32, 32)).astype(np.int32)
  run, _ = ppo_iteration.ours_runner(cfg, policy, reward, prompts, 64, ppo_iteration.hyper(2, 2))
  return lambda: run(1)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--what", choices=["pretrain", "sample", "greedy", "ppo"], default="sample")
  ap.add_argument("--calls", type=int, default=2)
  ap.add_argument("--top", type=int, default=12)
  args = ap.parse_args()
  common.header(f"op profile: {args.what}")
  fn = {"pretrain": pretrain_fn, "ppo": ppo_fn, "sample": lambda: sample_fn(False),
        "greedy": lambda: sample_fn(True)}[args.what]()
  print_table(*op_times(fn, args.calls), args.top)


if __name__ == "__main__":
  main()
