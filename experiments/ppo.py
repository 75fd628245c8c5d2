"""PPO-ptx: the SFT policy optimised against the reward model with a per-token KL penalty and the pretraining mix.

  python -m experiments.ppo --config=experiments/configs/ppo.py --workdir=/tmp/ppo \
      --config.train.init_from=/tmp/sft --config.ppo.reward_from=/tmp/rm \
      --config.data.prompts=rl_prompts.jsonl --config.data.ptx=corpus.txt --config.ppo.kl_coef=0.02
"""
from experiments import launch
from rlhf_jax import ppo

if __name__ == "__main__":
  launch.run(ppo.run)
