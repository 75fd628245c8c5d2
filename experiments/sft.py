"""Supervised fine-tuning on (prompt, response) demonstrations, loss on response tokens only.

  python -m experiments.sft --config=experiments/configs/sft.py --workdir=/tmp/sft \
      --config.data.train=demos.jsonl --config.train.init_from=/tmp/pretrain
"""
import functools

from experiments import launch
from rlhf_jax import stages

if __name__ == "__main__":
  launch.run(functools.partial(stages.run_lm, stage="sft"))
