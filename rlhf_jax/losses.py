"""Pure loss functions `(params, batch, rng, ...) -> (loss_sum, aux)` with aux as (sum, count) pairs.

lm: next-token cross-entropy on packed batches, counted where `loss_mask` is 1 (every real target for
pretraining, response targets only for SFT): CE(φ) = −E log y_k.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.model import Transformer, TransformerConfig


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
