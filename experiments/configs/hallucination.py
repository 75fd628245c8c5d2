"""The hallucination grid (`rlhf_jax.hallucination`): knowledge questions only, 2 demonstration policies × 2
rankings, shared pretraining; sized to finish in about 17 minutes on 2 loaded CPU cores.

  python -m experiments.hallucination --config=experiments/configs/hallucination.py --workdir=workdir/hallucination
  ... --config.grid.demo_policies='("full_knowledge",)'   # one row of the grid

Groups: those of the pipeline config (task, model, tokenizer, pretrain, sft, comparisons, reward, rl, ppo, eval;
task.demo_policy and task.fabrication_penalty are set per cell) plus grid (policies, penalties, evaluation samples).
Expected and measured: benchmarks/HALLUCINATION.md.
"""
import ml_collections

from rlhf_jax import hallucination


def get_config() -> ml_collections.ConfigDict:
  return hallucination.config()
