"""DPO config: the policy from an SFT workdir (also the frozen reference) on the RM's comparison JSONL.

  python -m experiments.dpo --config=experiments/configs/dpo.py --workdir=/tmp/dpo \
      --config.train.init_from=/tmp/sft --config.data.train=comparisons.jsonl \
      --config.data.eval=heldout_comparisons.jsonl

Variants: --config.dpo.loss_type=ipo (length-normalised log-ratios, squared), hinge, robust
(--config.dpo.label_smoothing=0.1), simpo (reference-free, --config.dpo.simpo_gamma=0.5); --config.dpo.beta=0.1.
Reference log-probs: --config.dpo.ref_logp=precompute (default; once per record, cached in the workdir) or on_the_fly.
Records: {"prompt", "responses": [...], "ranking": [...]} (all C(K,2) pairs) or {"prompt", "chosen", "rejected"}.
Expected: train_loss starts at log 2 = 0.693 (policy = reference, sigmoid) and falls; the held-out implicit-reward
accuracy (eval_accuracy in metrics.jsonl) rises well above 0.5 (on the embedded task's easy comparisons: >= 0.9).
The workdir is a policy (checkpoint stage "dpo"): pass it as init_from / to evaluation like an SFT or PPO workdir.
"""
import ml_collections

from rlhf_jax import dpo


def get_config() -> ml_collections.ConfigDict:
  return dpo.config()
