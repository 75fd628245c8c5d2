"""Pretraining config.

  python -m experiments.pretrain --config=experiments/configs/pretrain.py --workdir=/tmp/pretrain \
      --config.data.train=corpus.txt --config.data.eval=heldout.txt

Expected: on the embedded task's corpus (rlhf_jax.tasks), train loss falls from ~ln(vocab) ≈ 6.2 to
below 1.5 in a few hundred steps of the default 2-layer model on a laptop CPU.
"""
import ml_collections

from rlhf_jax import stages


def get_config() -> ml_collections.ConfigDict:
  return stages.lm_config("pretrain")
