"""SFT config: the pretraining model fine-tuned on JSONL {"prompt", "response"} demonstrations.

  python -m experiments.sft --config=experiments/configs/sft.py --workdir=/tmp/sft \
      --config.data.train=demos.jsonl --config.train.init_from=/tmp/pretrain

The model architecture and tokenizer come from `train.init_from` (a pretraining workdir, or hf:DIR for a
Hugging Face GPT-2/LLaMA checkpoint). Expected: response-token loss falls well below the pretrained model's
and greedy answers follow the instruction format.
"""
import ml_collections

from rlhf_jax import optimizer, stages, trainer


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.model = stages.model_config()
  cfg.tokenizer = stages.tokenizer_config()
  cfg.data = stages.lm_data_config(seq_len=128, batch_size=16)
  cfg.opt = optimizer.default_config(lr=5e-4)
  cfg.opt.warmup_steps = 10
  cfg.train = trainer.train_config(num_steps=200)
  return cfg
