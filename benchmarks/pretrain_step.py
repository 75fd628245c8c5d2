"""Pretraining step time: ours (trainer.train_step under parallel.jit on the data-parallel mesh, lm_loss, AdamW) vs PyTorch eager and
torch.compile (HF GPT2LMHeadModel with the same weights, AdamW + clipping), GPT-2 shape D=256 L=6 H=8,
T=256, batch 16, vocab 8192. Prints ours / PyTorch-eager (target <= 0.7), achieved FLOP/s as a fraction of the
measured matmul peak, and where our step's time goes (forward, backward, attention, head + loss, optimizer).

Command: .venv-bench/bin/python -m benchmarks.pretrain_step [--vocab 8192] [--reps 5] [--warmup 3] [--no-compile]
"""
from __future__ import annotations

import argparse
import functools

from benchmarks import common

import jax  # noqa: E402  (after common: threads pinned)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import losses, model, optimizer, parallel, trainer  # noqa: E402


def lm_batch(cfg: model.TransformerConfig, batch: int, seq: int, seed: int = 0) -> dict:
  """A random packed LM batch (one document per row, every target counted)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
  ones = np.ones((batch, seq), np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=np.broadcast_to(np.arange(seq), (batch, seq))
              .astype(np.int32), segment_ids=ones, loss_mask=ones)


def ours_step(cfg: model.TransformerConfig, params, batch: dict, loss_fn=None):
  """(step(), compile_s): one real `trainer.train_step` compiled over the default (data-parallel) mesh per call."""
  tx = optimizer.make_optimizer(optimizer.default_config(), 1000)
  loss_fn = loss_fn or functools.partial(losses.lm_loss, cfg=cfg)
  mesh = parallel.make_mesh()
  state = trainer.create_state(params, tx, 0)
  state_sh = parallel.state_shardings(mesh, state, None)
  p_train, _ = trainer.compile_steps(loss_fn, mesh, state_sh)
  holder = {"state": parallel.shard_tree(state, state_sh)}
  sharded = parallel.put_batch(mesh, batch)

  def step():
    holder["state"], sums = p_train(holder["state"], sharded)
    jax.block_until_ready(sums)

  return step, common.timed(step)


def torch_step(hf_model, batch: dict, compile_model: bool = False):
  """(step(), first_call_s): an eager (or torch.compile'd) GPT2LMHeadModel train step with AdamW + clipping."""
  torch = common.torch_setup()
  hf_model.train()
  decay = [p for p in hf_model.parameters() if p.ndim >= 2]
  no_decay = [p for p in hf_model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
  inputs = torch.from_numpy(np.asarray(batch["inputs"], np.int64))
  targets = torch.from_numpy(np.asarray(batch["targets"], np.int64))
  fwd = torch.compile(hf_model) if compile_model else hf_model

  def step():
    logits = fwd(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
    opt.step()

  return step, common.timed(step)


def breakdown(cfg: model.TransformerConfig, params, batch: dict, reps: int) -> dict[str, float]:
  """Median CPU seconds of jitted pieces of our step at the same shapes (single device)."""
  b = jax.tree.map(jnp.asarray, batch)
  loss_fn = functools.partial(losses.lm_loss, cfg=cfg)
  fwd = jax.jit(lambda p: loss_fn(p, b, None)[0])
  fwd_bwd = jax.jit(lambda p: jax.value_and_grad(loss_fn, has_aux=True)(p, b, None)[1])
  x_BxLxD = jax.random.normal(jax.random.PRNGKey(1), batch["inputs"].shape + (cfg.d_model,), jnp.float32)
  attn = model.Attention(cfg)
  attn_params = params["layer_0"]["attn"]

  def attn_loss(p, x):  # one attention block (q/k/v/o projections + masked softmax scores)
    return jnp.sum(attn.apply({"params": p}, x, b["positions"], b["segment_ids"], False))

  attn_fb = jax.jit(jax.grad(attn_loss, argnums=(0, 1)))

  def head_loss(emb, h):  # tied head + softmax cross-entropy
    logits = h @ emb.T
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1))

  head_fb = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
  emb = params["embed"]["embedding"]
  tx = optimizer.make_optimizer(optimizer.default_config(), 1000)
  opt_state = tx.init(params)
  opt = jax.jit(lambda g, s, p: tx.update(g, s, p))
  grads = fwd_bwd(params)
  fns = {"forward (loss)": lambda: fwd(params).block_until_ready(),
         "forward+backward": lambda: jax.block_until_ready(fwd_bwd(params)),
         "attention block fwd+bwd x L": lambda: jax.block_until_ready(attn_fb(attn_params, x_BxLxD)),
         "tied head + CE fwd+bwd": lambda: jax.block_until_ready(head_fb(emb, x_BxLxD)),
         "AdamW + clip update": lambda: jax.block_until_ready(opt(grads, opt_state, params))}
  _, cpu = common.interleaved(fns, reps)
  out = {k: common.med(v) for k, v in cpu.items()}
  out["attention block fwd+bwd x L"] *= cfg.num_layers
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=3, help="untimed calls per side after the first (compiling) one "
                  "(with BENCH_KEEP_MEMORY=1 they also grow the kept malloc heap to its high-water mark)")
  ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
  args = ap.parse_args()
  common.header(f"pretraining step: GPT-2 D=256 L=6 H=8 T={args.seq} batch {args.batch} vocab {args.vocab}")
  cfg = common.gpt2_config(vocab=args.vocab, max_len=args.seq)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  print(f"params {model.param_count(params) / 1e6:.2f} M", flush=True)
  batch = lm_batch(cfg, args.batch, args.seq)
  peak = common.matmul_peak()
  print("matmul peak (2048^3 float32): " + ", ".join(f"{k} {common.fmt_rate(v)}" for k, v in peak.items()))
  ours, ours_compile = ours_step(cfg, params, batch)
  hf = common.hf_copy(cfg, params)
  eager, eager_first = torch_step(hf, batch)
  print(f"compile/first call: ours {ours_compile:.1f} s, torch eager {eager_first:.1f} s "
        f"(HF attn_implementation={hf.config._attn_implementation})", flush=True)
  fns = {"ours": ours, "torch eager": eager}
  if not args.no_compile:
    try:
      compiled, compiled_first = torch_step(common.hf_copy(cfg, params), batch, compile_model=True)
      compiled()  # second call: inductor may recompile once for the train-mode graph
      print(f"torch.compile first call {compiled_first:.1f} s", flush=True)
      fns["torch.compile"] = compiled
    except Exception as e:  # noqa: BLE001 (report whatever inductor raises, then go on without it)
      print(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
  times, cpu = common.interleaved(fns, args.reps, warmup=args.warmup)
  flops = common.train_flops(cfg, args.batch, args.seq)
  print(f"step FLOPs (6N·tokens + attention) {flops / 1e9:.1f} G; {common.load()}")
  for name, ts in times.items():
    rate = flops / common.med(ts)
    print(f"  {name:14s} wall {common.spread(ts)}, CPU {common.med(cpu[name]):.3f} s  "
          f"{args.batch * args.seq / common.med(ts):6.0f} tokens/s  {common.fmt_rate(rate)} = "
          f"{rate / peak['jax']:.0%} of the jnp.dot peak")
  for name in fns:
    if name != "ours":
      print(f"RATIO ours / {name} step time = {common.med(times['ours']) / common.med(times[name]):.2f} wall, "
            f"{common.med(cpu['ours']) / common.med(cpu[name]):.2f} CPU"
            + ("  (target <= 0.70)" if name == "torch eager" else ""))
  print("where our step's time goes (median CPU s, jitted pieces at the same shapes):", flush=True)
  for name, s in breakdown(cfg, params, batch, max(3, args.reps - 2)).items():
    print(f"  {name:30s} {s:.3f}")
  print(common.load())


if __name__ == "__main__":
  main()
