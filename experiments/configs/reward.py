"""Reward-model config: SFT backbone + ScalarHead on the last token, Bradley–Terry over all C(K,2) pairs.

  python -m experiments.reward --config=experiments/configs/reward.py --workdir=/tmp/rm \
      --config.data.train=comparisons.jsonl --config.data.eval=heldout_comparisons.jsonl \
      --config.train.init_from=/tmp/sft --config.data.normalize_on=demos.jsonl

Records: {"prompt", "responses": [...], "ranking": [best index, ...]} or {"prompt", "chosen", "rejected"}.
Expected: held-out pairwise accuracy (eval_accuracy in metrics.jsonl) well above 0.5; on the embedded task
>= 0.9 after a few hundred steps.
"""
import ml_collections

from rlhf_jax import stages


def get_config() -> ml_collections.ConfigDict:
  return stages.reward_config()
