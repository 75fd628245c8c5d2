"""Compile time of one pretraining step (lm_loss, value_and_grad, AdamW) for a deep model: the blocks unrolled
(`layer_{i}`) vs one nn.scan (`scan_layers=True`), each with and without remat. Lowered from abstract shapes only
(jax.eval_shape: nothing allocated), so the 30-layer SmolLM2-135M shape compiles without its weights.

Command: python -m benchmarks.compile_time [--preset smollm2-135m | --layers 30 --d_model 64] [--seq 128]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from benchmarks import common

import jax  # noqa: E402  (after common: threads pinned)
import jax.numpy as jnp  # noqa: E402

from rlhf_jax import losses, model, optimizer, plan  # noqa: E402


def compile_seconds(cfg: model.TransformerConfig, batch: int, seq: int) -> float:
  """Wall seconds to lower and compile one jitted train step of `cfg` on a batch x seq LM batch."""
  tx = optimizer.make_optimizer(optimizer.default_config(), 1000)

  def step(params, opt_state, b):
    grads = jax.grad(lambda p: losses.lm_loss(p, b, None, cfg=cfg)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(jnp.add, params, updates), opt_state

  params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0)))
  opt_state = jax.eval_shape(tx.init, params)
  ints = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  b = dict(inputs=ints, targets=ints, positions=ints, segment_ids=ints, loss_mask=ints)
  t0 = time.perf_counter()
  jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, b).compile()
  return time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="", help="smollm2-135m, or empty for --layers/--d_model")
  ap.add_argument("--layers", type=int, default=30)
  ap.add_argument("--d_model", type=int, default=64)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--batch", type=int, default=4)
  args = ap.parse_args()
  common.header("compile time: unrolled vs scan_layers")
  if args.preset == "smollm2-135m":
    cfg = dataclasses.replace(plan.PRESETS["smollm2-135m"], max_len=max(args.seq, 128))
  else:
    cfg = model.TransformerConfig(vocab_size=8192, d_model=args.d_model, num_heads=4, num_kv_heads=2,
                                  d_ff=4 * args.d_model, num_layers=args.layers, max_len=args.seq, family="llama")
  print(f"model D={cfg.d_model} layers={cfg.num_layers} V={cfg.vocab_size}, batch {args.batch} x T={args.seq}")
  times = {}
  for scan in (False, True):
    for remat in ("none", "block"):
      s = compile_seconds(dataclasses.replace(cfg, scan_layers=scan, remat=remat), args.batch, args.seq)
      times[scan, remat] = s
      print(f"  scan_layers={scan!s:5} remat={remat:5}: compile {s:6.1f} s   ({common.load()})", flush=True)
  for remat in ("none", "block"):
    print(f"unrolled / scan (remat={remat}): {times[False, remat] / times[True, remat]:.1f}x")


if __name__ == "__main__":
  main()
