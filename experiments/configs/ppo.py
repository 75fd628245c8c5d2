"""PPO-ptx config (InstructGPT's RL stage).

  python -m experiments.ppo --config=experiments/configs/ppo.py --workdir=/tmp/ppo \
      --config.train.init_from=/tmp/sft --config.ppo.reward_from=/tmp/rm \
      --config.data.prompts=rl_prompts.jsonl --config.data.ptx=corpus.txt

Ablations: --config.ppo.kl_coef=0 (no KL penalty: reward hacking), --config.ppo.ptx_coef=0 (plain PPO: drift on
the pretraining distribution), --config.ppo.adaptive_kl=True --config.ppo.kl_target=2, --config.ppo.kl_estimator=k3.
Expected: the RM score (metrics.jsonl "score") rises over iterations while "kl" to the SFT policy stays small.
"""
import ml_collections

from rlhf_jax import ppo


def get_config() -> ml_collections.ConfigDict:
  return ppo.config()
