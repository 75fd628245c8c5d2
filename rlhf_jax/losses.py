"""Pure loss functions `(params, batch, rng, ...) -> (loss_sum, aux)` with aux as (sum, count) pairs.

lm: next-token cross-entropy on packed batches, counted where `loss_mask` is 1 (every real target for
pretraining, response targets only for SFT): CE(φ) = −E log y_k.
reward: Bradley–Terry over ranked responses, −log σ(s_w − s_l), all C(K,2) pairs of a prompt in one element.
The element-wise RL math (PPO clipped losses, GAE, KL estimators) lives in rl.py and is re-exported here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import rl
from rlhf_jax.model import ScalarHead, Transformer, TransformerConfig


def lm_loss(params, batch: dict, rng: jax.Array, *, cfg: TransformerConfig):
  """Masked next-token cross-entropy sum over `loss_mask`; aux: loss and next-token accuracy per counted token."""
  del rng  # deterministic forward (no dropout)
  logits_BxLxV, _ = Transformer(cfg).apply(
      {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
  mask_BxL = batch["loss_mask"].astype(jnp.float32)
  loss_sum = jnp.sum(nll_BxL * mask_BxL)
  count = jnp.sum(mask_BxL)
  correct = jnp.sum((jnp.argmax(logits_BxLxV, -1) == batch["targets"]) * mask_BxL)
  return loss_sum, {"loss": (loss_sum, count), "accuracy": (correct, count)}


def sequence_scores(params, tokens_NxL, positions_NxL, segment_ids_NxL, last_idx_N, *, cfg: TransformerConfig):
  """Reward-model scores: ScalarHead on the hidden state of each row's last non-pad token -> score_N.

  `params = {"backbone": transformer params, "head": ScalarHead params}`.
  """
  _, h_NxLxD = Transformer(cfg).apply({"params": params["backbone"]}, tokens_NxL, positions_NxL, segment_ids_NxL)
  h_NxD = jnp.take_along_axis(h_NxLxD, last_idx_N[:, None, None].astype(jnp.int32), axis=1)[:, 0]
  return ScalarHead(cfg).apply({"params": params["head"]}, h_NxD[:, None])[:, 0]


def reward_loss(params, batch: dict, rng: jax.Array, *, cfg: TransformerConfig):
  """Bradley–Terry over all C(K,2) ranked pairs of each prompt, one forward per response: −log σ(s_w − s_l).

  Batch (from data.make_comparison_loader): tokens/positions/segment_ids BxKxL, last_idx/rank/valid BxK.
  Returns the summed pair loss; aux: loss, accuracy, margin per pair; score and score² per valid response.
  """
  del rng
  B, K, L = batch["tokens"].shape
  flat = lambda x: x.reshape((B * K,) + x.shape[2:])
  score_N = sequence_scores(params, flat(batch["tokens"]), flat(batch["positions"]), flat(batch["segment_ids"]),
                            flat(batch["last_idx"]), cfg=cfg)
  valid_BxK = batch["valid"].astype(jnp.float32)
  score_BxK = score_N.reshape(B, K) * valid_BxK  # NaN-poisoned masks reach the loss
  loss, aux = rl.pairwise_bradley_terry(score_BxK, batch["rank"], valid_BxK)
  pairs = aux["num_pairs"].astype(jnp.float32)
  n = jnp.sum(valid_BxK)
  return loss * pairs, {"loss": (loss * pairs, pairs), "accuracy": (aux["accuracy"] * pairs, pairs),
                        "margin": (aux["margin"] * pairs, pairs), "score": (jnp.sum(score_BxK), n),
                        "score_sq": (jnp.sum(score_BxK ** 2), n)}


bradley_terry_loss = rl.bradley_terry_loss
ppo_policy_loss = rl.ppo_policy_loss
ppo_value_loss = rl.ppo_value_loss
