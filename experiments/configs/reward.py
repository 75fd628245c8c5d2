"""Reward-model config: SFT backbone + ScalarHead on the last token, Bradley–Terry over all C(K,2) pairs.

  python -m experiments.reward --config=experiments/configs/reward.py --workdir=/tmp/rm \
      --config.data.train=comparisons.jsonl --config.data.eval=heldout_comparisons.jsonl \
      --config.train.init_from=/tmp/sft --config.data.normalize_on=demos.jsonl

Records: {"prompt", "responses": [...], "ranking": [best index, ...]} or {"prompt", "chosen", "rejected"}.
Expected: held-out pairwise accuracy (eval_accuracy in metrics.jsonl) well above 0.5; on the embedded task
>= 0.9 after a few hundred steps.
"""
import ml_collections

from rlhf_jax import optimizer, stages, trainer


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.model = stages.model_config()
  cfg.tokenizer = stages.tokenizer_config()
  cfg.data = stages.reward_data_config(seq_len=128, batch_size=8)
  cfg.opt = optimizer.default_config(lr=3e-4)
  cfg.opt.warmup_steps = 10
  cfg.train = trainer.train_config(num_steps=200)
  return cfg
