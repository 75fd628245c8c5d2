"""LoRA step-time cost: one SFT `trainer.train_step` (lm_loss, AdamW) at the embedded pipeline's model size
(gpt2 D=128, 3 layers, H=4, F=512, vocab 512, T=64, batch 16), interleaved: full fine-tuning, LoRA as the stages
run it (the model's unmerged path, x·W + (x·A)·B: lora.join) and LoRA merged into the kernels inside the step
(W + (α/r)·A·B: lora.merge, the mechanism before 2026-12-03). Prints each / full wall and CPU time, and the
trained parameter counts.

Command: /work/main/.venv/bin/python -m benchmarks.lora_step [--rank 8] [--targets attn,mlp] [--reps 30]
"""
from __future__ import annotations

import argparse
import functools

from benchmarks import common

import jax  # noqa: E402  (after common: threads pinned)
import numpy as np  # noqa: E402

from rlhf_jax import lora, losses, model, optimizer, parallel, trainer  # noqa: E402
from benchmarks.pretrain_step import lm_batch  # noqa: E402


def step_fn(cfg, params, batch, spec: lora.Spec | None, merged: bool = False):
  """step() running one real train_step compiled over the mesh: full params, or adapters on the frozen `params`."""
  tx = optimizer.make_optimizer(optimizer.default_config(), 1000)
  loss_fn = functools.partial(losses.lm_loss, cfg=cfg)
  frozen = None
  trained = params
  if spec is not None:
    trained, frozen = lora.split(params, spec, jax.random.PRNGKey(1))
    if merged:
      lm = loss_fn
      loss_fn = lambda trainable, b, rng, base: lm(lora.merge(base, trainable["adapters"], spec), b, rng)
    else:
      loss_fn = lora.with_base(loss_fn, spec)
  mesh = parallel.make_mesh()  # data parallel over the local devices, as the stages run by default
  state = trainer.create_state(trained, tx, 0)
  state_sh = jax.tree.map(lambda _: parallel.replicated(mesh), state)
  frozen_sh = None if frozen is None else jax.tree.map(lambda _: parallel.replicated(mesh), frozen)
  p_train, _ = trainer.compile_steps(loss_fn, mesh, state_sh, frozen_sh)
  holder = {"state": parallel.shard_tree(state, state_sh)}
  base = () if frozen is None else (parallel.shard_tree(frozen, frozen_sh),)
  sharded = parallel.put_batch(mesh, batch)

  def step():
    holder["state"], sums = p_train(holder["state"], sharded, *base)
    jax.block_until_ready(sums)

  return step, holder


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--targets", default="attn,mlp")
  ap.add_argument("--reps", type=int, default=30)
  args = ap.parse_args()
  common.header("LoRA vs full fine-tuning: SFT train_step at the pipeline's size")
  cfg = model.TransformerConfig(vocab_size=512, d_model=128, num_heads=4, num_kv_heads=4, d_ff=512, num_layers=3,
                                max_len=64)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  batch = lm_batch(cfg, 16, 64)
  c = lora.config()
  c.update(rank=args.rank, targets=args.targets)
  spec = lora.Spec.from_config(c)
  full, full_h = step_fn(cfg, params, batch, None)
  low, low_h = step_fn(cfg, params, batch, spec)
  merged, _ = step_fn(cfg, params, batch, spec, merged=True)
  times, cpu = common.interleaved({"full": full, "lora": low, "lora_merged": merged}, args.reps, warmup=3)
  n_full = lora.param_count(params)
  n_lora = lora.param_count(parallel.to_host(low_h["state"].params))
  print(f"trained params: full {n_full}, LoRA r={args.rank} {args.targets} {n_lora} ({n_lora / n_full:.3%})")
  for k in times:
    print(f"{k}: wall {common.spread(times[k])}, CPU {common.med(cpu[k]):.3f} s")
  for k in ("lora", "lora_merged"):
    print(f"RATIO {k} / full step time = {common.med(times[k]) / common.med(times['full']):.2f} wall, "
          f"{common.med(cpu[k]) / common.med(cpu['full']):.2f} CPU")
  print(common.load())


if __name__ == "__main__":
  main()
