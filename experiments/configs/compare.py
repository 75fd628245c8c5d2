"""The methods the field compares PPO with, side by side on the pipeline's workdir, at an equal sampled budget.

  python -m experiments.compare --config=experiments/configs/compare.py --workdir=workdir/demo

Groups: the pipeline's (task, model, pretrain, sft, comparisons, reward, rl, ppo, eval: the base stages are the
pipeline's, built if missing, and every RL method starts from the pipeline's PPO settings), compare (which methods,
the sampled-response budget per RL method, frontier checkpoints, best-of-n sizes) and methods.<name> (each
method's kind and its ppo / dpo overrides: --config.methods.grpo.ppo.kl_coef=0.02).
Prints one table (held-out oracle score sampled with its standard error over prompts, greedy, exact match, KL to
SFT, pretraining-corpus loss, training wall time) and writes workdir/compare/frontier.png (held-out oracle score
against KL to SFT over training). Measured: BENCHMARKS.md, "Side by side".
"""
import ml_collections

from experiments.configs import pipeline as pipeline_config
from rlhf_jax import compare


def get_config() -> ml_collections.ConfigDict:
  return pipeline_config.main_job_sizes(compare.config())  # the pipeline's base stages, at `make demo`'s sizes
