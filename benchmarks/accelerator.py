"""One command for a GPU/TPU: pretraining MFU (GPT-2 124M, bf16 compute, T=1024), sampler tokens/s at batch 256,
and a PPO iteration's generation / scoring / update split (GPT-2 124M policy, value, reference and reward model).
On CPU (or with --tiny) the same code runs tiny shapes, so the suite can run it (tests/test_benchmarks.py).

Every number comes from the library's own compiled functions through the helpers of the CPU benchmarks:
pretrain_step.ours_step (trainer.train_step), sampling_bench.ours_sampler (sampling.sample) and
ppo_iteration.ours_runner (sampling.make_sampler, ppo.score_rollout, ppo.ppo_update); a change to how those are
jitted is made there, not here.

Command: python -m benchmarks.accelerator [--tiny] [--steps 10] [--peak_tflops X] [--scan_layers] [--remat block]
"""
from __future__ import annotations

import argparse
import dataclasses

from benchmarks import common

import jax  # noqa: E402  (after common: threads pinned)
import numpy as np  # noqa: E402

from benchmarks import ppo_iteration, pretrain_step  # noqa: E402
from benchmarks import sampling as sampling_bench  # noqa: E402
from rlhf_jax import model  # noqa: E402

PEAK_BF16_TFLOPS = (("H200", 989), ("H100", 989), ("A100", 312), ("L40S", 362), ("L4", 121), ("TPU v6", 918),
                    ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5", 459), ("TPU v4", 275))  # dense bf16


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The benchmark's sizes: the model and each phase's batch and lengths."""
  cfg: model.TransformerConfig
  train_batch: int
  seq: int  # pretraining T
  sample_batch: int
  prompt: int
  new: int
  ppo_batch: int


def shapes(tiny: bool, args) -> Shapes:
  """GPT-2 124M (V=50257 D=768 L=12 H=12, bf16 compute, float32 params) or a tiny GPT-2 for CPU runs."""
  if tiny:
    cfg = common.gpt2_config(vocab=128, d_model=32, layers=1, heads=2, max_len=32)
    out = Shapes(cfg, train_batch=4, seq=32, sample_batch=8, prompt=8, new=8, ppo_batch=8)
  else:
    cfg = common.gpt2_config(vocab=50257, d_model=768, layers=12, heads=12, max_len=1024)
    out = Shapes(cfg, train_batch=args.train_batch, seq=1024, sample_batch=256, prompt=128, new=128,
                 ppo_batch=args.ppo_batch)
  cfg = dataclasses.replace(out.cfg, dtype="bfloat16", scan_layers=args.scan_layers, remat=args.remat)
  return dataclasses.replace(out, cfg=cfg)


def peak_flops(args) -> tuple[float, str]:
  """(peak FLOP/s, where it comes from): --peak_tflops, the bf16 table by device kind, or a measured CPU matmul."""
  if args.peak_tflops:
    return args.peak_tflops * 1e12, "--peak_tflops"
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in kind.lower():
      return tflops * 1e12 * jax.local_device_count(), f"{kind} dense bf16 x {jax.local_device_count()}"
  return common.matmul_peak(512 if args.tiny else 2048)["jax"], f"measured float32 matmul on {kind}"


def pretraining(s: Shapes, params, args) -> None:
  """Median step time of trainer.train_step and the MFU it gives."""
  batch = pretrain_step.lm_batch(s.cfg, s.train_batch, s.seq)
  step, compile_s = pretrain_step.ours_step(s.cfg, params, batch)
  times = [common.timed(step) for _ in range(args.steps)]
  peak, source = peak_flops(args)
  flops = common.train_flops(s.cfg, s.train_batch, s.seq)
  t = common.med(times)
  print(f"pretraining: batch {s.train_batch} x T={s.seq}, step {common.spread(times)} (first {compile_s:.1f} s), "
        f"{s.train_batch * s.seq / t:.0f} tokens/s, {flops / t / 1e12:.2f} TFLOP/s; MFU {flops / t / peak:.1%} "
        f"of {peak / 1e12:.1f} TFLOP/s ({source})", flush=True)


def sampler(s: Shapes, params, args) -> None:
  """Sampled tokens per second of sampling.sample at batch sample_batch (EOS never sampled: full length)."""
  prompts = np.random.default_rng(0).integers(1, s.cfg.vocab_size - 1, (s.sample_batch, s.prompt)).astype(np.int32)
  call, compile_s = sampling_bench.ours_sampler(s.cfg, params, prompts, s.new, greedy=False,
                                                eos_id=s.cfg.vocab_size - 1)
  times = [common.timed(call) for _ in range(max(2, args.steps // 3))]
  print(f"sampler: batch {s.sample_batch}, prompt {s.prompt} -> {s.new} new tokens, {common.spread(times)} per call "
        f"(first {compile_s:.1f} s): {s.sample_batch * s.new / common.med(times):.0f} sampled tokens/s", flush=True)


def ppo_split(s: Shapes, params, args) -> None:
  """One PPO iteration's generation / scoring / update seconds (medians, the compiling first iteration out)."""
  prompts = np.random.default_rng(1).integers(1, s.cfg.vocab_size - 1, (s.ppo_batch, s.prompt)).astype(np.int32)
  reward = {"backbone": params, "head": {"dense": {"kernel": np.zeros((s.cfg.d_model, 1), np.float32),
                                                  "bias": np.zeros((1,), np.float32)}}}
  run, out = ppo_iteration.ours_runner(s.cfg, params, reward, prompts, s.new, ppo_iteration.hyper(2, 2))
  run(1 + max(2, args.steps // 3))
  phases = {k: common.med(out[k][1:]) for k in ("generation", "scoring", "update")}
  total = sum(phases.values())
  print(f"ppo iteration: {s.ppo_batch} prompts x {s.prompt} -> {s.new} tokens, 2 epochs x 2 minibatches: "
        + ", ".join(f"{k} {v:.3f} s ({v / total:.0%})" for k, v in phases.items())
        + f"; first iteration {sum(out[k][0] for k in phases):.1f} s", flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--tiny", action="store_true", help="tiny shapes (the default on CPU)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--train_batch", type=int, default=16)
  ap.add_argument("--ppo_batch", type=int, default=64)
  ap.add_argument("--peak_tflops", type=float, default=0.0)
  ap.add_argument("--scan_layers", action="store_true")
  ap.add_argument("--remat", default="none")
  args = ap.parse_args(argv)
  args.tiny = args.tiny or jax.default_backend() == "cpu"
  common.header(f"accelerator: {jax.default_backend()} ({'tiny shapes' if args.tiny else 'GPT-2 124M'})")
  s = shapes(args.tiny, args)
  params = model.init_params(s.cfg, jax.random.PRNGKey(0))
  print(f"model {model.param_count(params) / 1e6:.1f}M params, compute {s.cfg.dtype}, scan_layers "
        f"{s.cfg.scan_layers}, remat {s.cfg.remat}, attention path {model.attention_path(s.cfg, s.seq)}")
  pretraining(s, params, args)
  sampler(s, params, args)
  ppo_split(s, params, args)


if __name__ == "__main__":
  main()
