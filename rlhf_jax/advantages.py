"""The RL step's advantage per method (`ppo.advantage`), inside the compiled scoring of a global rollout batch.

"gae": shaped rewards r_t = −β·kl_t (+ score on the last token), GAE(γ, λ) on the critic's values;
"rloo": the same shaped rewards around the leave-one-out baselined score, reward-to-go (GAE with V = 0, λ = 1);
"grpo": A_b = `rl.group_advantages` of the group's scores (minus β·Σ_t kl_t when kl_in="reward"), on every token.
gae/rloo advantages are optionally whitened over the whole batch's valid tokens. DAPO's dynamic sampling
(`drop_equal_groups`) zeroes the loss mask of groups whose scores are all equal (static shapes, no resampling).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import rl


def global_whiten(x_BxT, mask_BxT):
  """masked_whiten over the global batch: (x − μ)/√(σ² + 1e-8), μ and population σ² over the valid entries."""
  n = jnp.sum(mask_BxT)
  mean = jnp.sum(x_BxT * mask_BxT) / n
  var = jnp.sum(jnp.square(x_BxT - mean) * mask_BxT) / n
  return jnp.where(mask_BxT > 0, (x_BxT - mean) * jax.lax.rsqrt(var + 1e-8), 0.0)


def group_baselined(score_B, G: int):
  """Each score minus the mean of the other G - 1 scores of its group (rows g·G .. g·G + G - 1: the same prompt).

  A Bradley–Terry RM is trained on within-prompt differences only, so its per-prompt level is arbitrary; the
  leave-one-out baseline (RLOO) removes it before PPO sees it.
  """
  score_NxG = score_B.reshape(-1, G)
  return (score_NxG - (jnp.sum(score_NxG, axis=1, keepdims=True) - score_NxG) / (G - 1)).reshape(-1)


def group_kept(score_B, G: int):
  """1 for the rows of groups whose G scores are not all equal, else 0 (DAPO's dynamic sampling, as a mask)."""
  score_NxG = score_B.reshape(-1, G)
  keep_N = jnp.max(score_NxG, axis=1) > jnp.min(score_NxG, axis=1)
  return jnp.repeat(keep_N.astype(jnp.float32), G)


def group_relative(score_B, ppo):
  """`rl.group_advantages` of the global batch; scale_rewards="batch" divides by the Bessel-corrected std
  √(Σ(r − r̄)² / (n − 1)) of all its scores."""
  if ppo.scale_rewards != "batch":
    return rl.group_advantages(score_B, ppo.group_size, ppo.scale_rewards)
  n = jnp.float32(score_B.shape[0])
  mean = jnp.sum(score_B) / n
  var = jnp.sum(jnp.square(score_B - mean)) / (n - 1)
  return rl.group_advantages(score_B, ppo.group_size, "none") / (jnp.sqrt(var) + 1e-4)


def per_method(score_B, kl_BxT, values_BxT, mask_BxT, kl_coef, ppo):
  """(advantages_BxT, returns_BxT, loss mask_BxT, kept rows_B) of one scored rollout for `ppo.advantage`."""
  reward_kl = kl_coef if ppo.kl_in == "reward" else 0.0  # kl_in="loss": β·k3 goes into the update's loss instead
  keep_B = group_kept(score_B, ppo.group_size) if ppo.drop_equal_groups else jnp.ones_like(score_B)
  loss_mask_BxT = mask_BxT * keep_B[:, None]
  if ppo.advantage == "grpo":  # the group-relative score (minus β·Σ_t kl_t with kl_in="reward") on every token
    adv_B = group_relative(score_B - reward_kl * jnp.sum(kl_BxT, axis=1), ppo)
    adv_BxT, ret_BxT = adv_B[:, None] * mask_BxT, jnp.zeros_like(mask_BxT)
  elif ppo.advantage == "rloo":  # the group is the baseline, no critic; advantage = reward-to-go
    rewards_BxT = rl.shaped_rewards(group_baselined(score_B, ppo.group_size), kl_BxT, mask_BxT, reward_kl)
    adv_BxT, ret_BxT = rl.gae(jnp.zeros_like(values_BxT), rewards_BxT, mask_BxT, ppo.gamma, 1.0)
  else:
    rewards_BxT = rl.shaped_rewards(score_B, kl_BxT, mask_BxT, reward_kl)
    adv_BxT, ret_BxT = rl.gae(values_BxT, rewards_BxT, mask_BxT, ppo.gamma, ppo.lam)
  if ppo.whiten_advantages and ppo.advantage != "grpo":
    adv_BxT = global_whiten(adv_BxT, loss_mask_BxT)
  return adv_BxT, ret_BxT, loss_mask_BxT, keep_B
