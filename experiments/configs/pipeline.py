"""The whole pipeline on the embedded task (`make demo`), sized to finish in about 10 minutes on 2 CPU cores.

  python -m experiments.pipeline --config=experiments/configs/pipeline.py --workdir=workdir/demo

Groups: task (rlhf_jax.tasks.TaskConfig fields), model/tokenizer (the pretrained model), pretrain/sft/reward/rl
(each stage's data/opt/train groups, laid over that experiment's own get_config()), comparisons (SFT samples
ranked for the RM), ppo (the PPO knobs: --config.ppo.kl_coef=0, --config.ppo.ptx_coef=0 ...), eval.
Expected (BENCHMARKS.md): held-out sampled oracle score pretrain < SFT < PPO; RM held-out pairwise accuracy high.
"""
import ml_collections

from rlhf_jax import pipeline


def get_config() -> ml_collections.ConfigDict:
  return pipeline.config()
