"""The whole pipeline on the embedded task (`make demo`), sized to finish in about 10 minutes on 2 CPU cores.

  python -m experiments.pipeline --config=experiments/configs/pipeline.py --workdir=workdir/demo

Groups: task (rlhf_jax.tasks.TaskConfig fields), model/tokenizer (the pretrained model), pretrain/sft/reward/rl
(each stage's data/opt/train groups, laid over that experiment's own get_config()), comparisons (SFT samples
ranked for the RM), ppo (the PPO knobs: --config.ppo.kl_coef=0, --config.ppo.ptx_coef=0 ...), eval.
Expected (BENCHMARKS.md): held-out sampled oracle score pretrain < SFT < PPO; RM held-out pairwise accuracy high.
"""
import ml_collections

from rlhf_jax import ppo, stages


def _stage(steps: int, lr: float, batch_size: int, seq_len: int, warmup: int = 20) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "data": {"batch_size": batch_size, "seq_len": seq_len},
      "opt": {"lr": lr, "warmup_steps": warmup},
      "train": {"num_steps": steps, "log_every": 25, "eval_every": 0, "checkpoint_every": steps}})


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.task = ml_collections.ConfigDict(dict(
      seed=0, num_corpus_docs=4000, num_demonstrations=2000, num_rl_prompts=1000, num_heldout_prompts=200,
      demo_error_rate=0.25, comparison_noise_rate=0.1, num_candidates=4))
  cfg.model = stages.model_config()
  cfg.model.d_model, cfg.model.num_heads, cfg.model.num_kv_heads = 128, 4, 4
  cfg.model.d_ff, cfg.model.num_layers, cfg.model.max_len = 512, 3, 64
  cfg.tokenizer = ml_collections.ConfigDict({"vocab_size": 512, "model_type": "bpe"})
  cfg.pretrain = _stage(steps=600, lr=2e-3, batch_size=32, seq_len=64)
  cfg.sft = _stage(steps=300, lr=5e-4, batch_size=32, seq_len=64)
  cfg.comparisons = ml_collections.ConfigDict(dict(num_prompts=600, num_heldout=100, temperature=1.0))
  cfg.reward = _stage(steps=300, lr=3e-4, batch_size=16, seq_len=48)
  cfg.rl = _stage(steps=100, lr=2e-5, batch_size=16, seq_len=64, warmup=0)
  cfg.rl.data = ml_collections.ConfigDict(dict(prompt_len=24, ptx_seq_len=64, ptx_batch_size=16))
  cfg.rl.train.log_every = 10
  cfg.ppo = ppo.ppo_config()
  cfg.ppo.max_new_tokens = 16
  cfg.ppo.rollout_batch = 32
  cfg.ppo.sample_every = 20
  cfg.eval = ml_collections.ConfigDict(dict(num_prompts=200, seed=0))
  return cfg
