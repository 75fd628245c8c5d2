"""SFT config: the pretraining model fine-tuned on JSONL {"prompt", "response"} demonstrations.

  python -m experiments.sft --config=experiments/configs/sft.py --workdir=/tmp/sft \
      --config.data.train=demos.jsonl --config.train.init_from=/tmp/pretrain

The model architecture and tokenizer come from `train.init_from` (a pretraining workdir, or hf:DIR for a
Hugging Face GPT-2/LLaMA checkpoint). Expected: response-token loss falls well below the pretrained model's
and greedy answers follow the instruction format.
"""
import ml_collections

from rlhf_jax import stages


def get_config() -> ml_collections.ConfigDict:
  return stages.lm_config("sft")
