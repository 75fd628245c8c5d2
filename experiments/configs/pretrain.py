"""Pretraining config.

  python -m experiments.pretrain --config=experiments/configs/pretrain.py --workdir=/tmp/pretrain \
      --config.data.train=corpus.txt --config.data.eval=heldout.txt

Expected: on the embedded task's corpus (rlhf_jax.tasks), train loss falls from ~ln(vocab) ≈ 6.2 to
below 1.5 in a few hundred steps of the default 2-layer model on a laptop CPU.
"""
import ml_collections

from rlhf_jax import optimizer, stages, trainer


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.model = stages.model_config()
  cfg.tokenizer = stages.tokenizer_config()
  cfg.data = stages.lm_data_config(seq_len=128, batch_size=16)
  cfg.opt = optimizer.default_config(lr=1e-3)
  cfg.train = trainer.train_config(num_steps=400)
  return cfg
