"""Pretraining: next-token cross-entropy on packed plain text.

  python -m experiments.pretrain --config=experiments/configs/pretrain.py --workdir=/tmp/pretrain \
      --config.data.train=corpus.txt --config.train.num_steps=500
"""
import functools

from experiments import launch
from rlhf_jax import stages

if __name__ == "__main__":
  launch.run(functools.partial(stages.run_lm, stage="pretrain"))
