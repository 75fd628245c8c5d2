"""DPO (and IPO, SimPO, ...): the policy trained directly on ranked comparisons, initialised from an SFT workdir.

  python -m experiments.dpo --config=experiments/configs/dpo.py --workdir=/tmp/dpo \
      --config.data.train=comparisons.jsonl --config.train.init_from=/tmp/sft
"""
from experiments import launch
from rlhf_jax import dpo

if __name__ == "__main__":
  launch.run(dpo.run_dpo)
