"""Side by side on one pipeline workdir: PPO (GAE), RLOO, GRPO, DAPO, DPO, IPO, best-of-n; one table + frontier PNG.

  python -m experiments.compare --config=experiments/configs/compare.py --workdir=workdir/demo
  python -m experiments.compare --config=experiments/configs/compare.py --workdir=workdir/demo \
      --config.compare.run=rloo,best_of_n --config.compare.budget=12800

The base stages (pretrain, SFT, comparisons, RM) of the workdir are built if missing; each method trains into
`workdir/compare/<method>`; a re-run re-uses finished methods.
"""
from experiments import launch
from rlhf_jax import compare

if __name__ == "__main__":
  launch.run(compare.run)
