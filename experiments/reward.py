"""Reward model: Bradley–Terry on ranked comparisons, initialised from an SFT workdir.

  python -m experiments.reward --config=experiments/configs/reward.py --workdir=/tmp/rm \
      --config.data.train=comparisons.jsonl --config.train.init_from=/tmp/sft
"""
from experiments import launch
from rlhf_jax import stages

if __name__ == "__main__":
  launch.run(stages.run_reward)
