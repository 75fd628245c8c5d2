"""Our two KL-regularised RL iterations side by side: PPO with a critic (GAE on a value network, `group_size=1`)
vs RLOO (`group_size=G`, leave-one-out baseline, no value network), same policy / reference / reward model and the
same rollout batch, 2 epochs x 2 minibatches, no ptx. Default shape: the pipeline's (D=128 L=3 H=4 F=512 vocab 512,
256 responses, prompts of 16 tokens -> 12 new tokens, random weights). Prints each variant's median iteration time
split generation / scoring / update, and RLOO / PPO in seconds per iteration (what `make demo`'s PPO stage saves).

Command: .venv/bin/python -m benchmarks.rl_variants [--iters 6] [--gpt2]   (no peers needed: jax only)
"""
from __future__ import annotations

import argparse

from benchmarks import common

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import ppo_iteration, rloo_iteration  # noqa: E402
from rlhf_jax import model, stages  # noqa: E402


def pipeline_config() -> model.TransformerConfig:
  """The pipeline's model (rlhf_jax.pipeline.config().model) with its tokenizer's 512 pieces."""
  return model.TransformerConfig(vocab_size=512, d_model=128, num_heads=4, num_kv_heads=4, d_ff=512, num_layers=3,
                                 max_len=64)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prompts", type=int, default=64, help="distinct prompts (RLOO samples each G times)")
  ap.add_argument("--group", type=int, default=4, help="G of RLOO; PPO gets prompts x G distinct prompts")
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--new", type=int, default=12)
  ap.add_argument("--iters", type=int, default=6, help="timed iterations of each after the first (compile) one")
  ap.add_argument("--gpt2", action="store_true", help="GPT-2 D=256 L=6 vocab 8192 (figure 3's model) instead")
  args = ap.parse_args()
  cfg = common.gpt2_config(vocab=8192, max_len=256) if args.gpt2 else pipeline_config()
  rows = args.prompts * args.group
  common.header(f"PPO (critic, GAE) vs RLOO (G={args.group}, no critic): D={cfg.d_model} L={cfg.num_layers} vocab "
                f"{cfg.vocab_size}, {rows} responses, {args.prompt} -> {args.new} tokens, 2 epochs x 2 minibatches")
  policy = model.init_params(cfg, jax.random.PRNGKey(0))
  reward = stages.fresh_reward_params(cfg, jax.random.PRNGKey(1))
  prompts_BxP = np.random.default_rng(0).integers(2, cfg.vocab_size - 1, (rows, args.prompt), dtype=np.int32)
  run_ppo, ppo_out = ppo_iteration.ours_runner(cfg, policy, reward, prompts_BxP, args.new, ppo_iteration.hyper(2, 2))
  grouped_BxP = np.repeat(prompts_BxP[:args.prompts], args.group, axis=0)
  run_rloo, rloo_out = rloo_iteration.ours_runner(cfg, policy, reward, grouped_BxP, args.new,
                                                  rloo_iteration.hyper(2, 2, args.group), args.iters + 1)
  for run in (run_ppo, run_rloo):
    run(1)  # compiles
  for _ in range(args.iters):  # ABAB
    run_ppo(1)
    run_rloo(1)
  print(f"results ({common.load()}), medians of {args.iters}:")
  total = {}
  for name, out in (("PPO + critic", ppo_out), ("RLOO", rloo_out)):
    phases = {k: common.med(out[k][1:]) for k in ("generation", "scoring", "update")}
    total[name] = common.med([g + s + u for g, s, u in zip(out["generation"][1:], out["scoring"][1:],
                                                           out["update"][1:])])
    print(f"  {name:13s} iteration {total[name]:.3f} s (CPU {common.med(out['cpu'][1:]):.3f}): " +
          ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()) +
          f"; compile {out['generation'][0] + out['scoring'][0] + out['update'][0]:.1f} s")
  print(f"RATIO RLOO / PPO + critic seconds per iteration = {total['RLOO'] / total['PPO + critic']:.2f}")


if __name__ == "__main__":
  main()
