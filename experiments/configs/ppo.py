"""PPO-ptx config (InstructGPT's RL stage).

  python -m experiments.ppo --config=experiments/configs/ppo.py --workdir=/tmp/ppo \
      --config.train.init_from=/tmp/sft --config.ppo.reward_from=/tmp/rm \
      --config.data.prompts=rl_prompts.jsonl --config.data.ptx=corpus.txt

Ablations: --config.ppo.kl_coef=0 (no KL penalty: reward hacking), --config.ppo.ptx_coef=0 (plain PPO: drift on
the pretraining distribution), --config.ppo.adaptive_kl=True --config.ppo.kl_target=2, --config.ppo.kl_estimator=k3.
Expected: the RM score (metrics.jsonl "score") rises over iterations while "kl" to the SFT policy stays small.
"""
import ml_collections

from rlhf_jax import optimizer, ppo, trainer


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.data = ml_collections.ConfigDict()
  cfg.data.prompts = ""  # RL prompts JSONL {"prompt"} (or tfds:NAME)
  cfg.data.ptx = ""  # pretraining text for the ptx term (required when ppo.ptx_coef > 0)
  cfg.data.prompt_len = 32  # P: prompts are left-padded to this many tokens (incl. bos)
  cfg.data.truncate = False  # cut prompts longer than prompt_len from the left instead of raising
  cfg.data.ptx_seq_len = 64  # packed pretraining rows for the ptx term
  cfg.data.ptx_batch_size = 16  # ptx rows per iteration (split over the minibatches)
  cfg.data.seed = 0  # prompt order
  cfg.ppo = ppo.ppo_config()
  cfg.opt = optimizer.default_config(lr=2e-5)
  cfg.opt.warmup_steps = 0
  cfg.opt.schedule = "constant"
  cfg.opt.weight_decay = 0.0
  cfg.train = trainer.train_config(num_steps=100)  # num_steps = PPO iterations (rollout + update)
  cfg.train.log_every = 1
  cfg.train.checkpoint_every = 25
  return cfg
