"""Pure RL math for PPO-ptx, GRPO and the reward model: log-probs, KL estimators, shaped rewards, GAE, group
advantages, PPO / GRPO (DAPO, Dr. GRPO, GSPO) policy losses.

Every array function is pure `jnp` and jit-able; string arguments (`estimator`) are static. Masks are 0/1
(bool, int or float) and may have leading zeros (left padding), trailing zeros (right padding) or both.
Masked positions never leak: inputs there are replaced by 0 with `jnp.where` before any arithmetic, so even
NaN/Inf there changes neither outputs nor gradients. Token means are over all valid tokens of the batch.
The KL controllers are plain Python objects that live on the host; pass `controller.value` into a jitted step
as an array so a new coefficient does not recompile.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
GROUP_SCALES = ("group", "batch", "none")  # group_advantages' divisor: group std, batch std, none (Dr. GRPO)
LOSS_AGGS = ("grpo", "bnpo", "dapo", "dr_grpo")  # grpo_policy_loss' aggregation over tokens and sequences
RATIO_LEVELS = ("token", "sequence")  # importance ratio per token (PPO/GRPO) or per sequence (GSPO)
_WHITEN_EPS = 1e-8


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _valid(mask):
  return jnp.asarray(mask) != 0


def _zero_out(x, mask):
  """x where mask is 1, 0 elsewhere (float32); the 'double where' that keeps NaN out of gradients."""
  return jnp.where(_valid(mask), _f32(x), 0.0)


def _check_same_shape(fn, **arrays):
  shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"rl.{fn}: arguments must have one shape; got {shapes}")


# ----------------------------------------------------------------------------------------------- log-probs


def token_logprobs(logits_BxTxV, tokens_BxT):
  """log π(tokens) = logits[token] − logsumexp(logits) over V, in float32 (log-softmax gathered at tokens)."""
  if jnp.shape(logits_BxTxV)[:-1] != jnp.shape(tokens_BxT):
    raise ValueError(f"rl.token_logprobs: logits shape {jnp.shape(logits_BxTxV)} does not match tokens shape "
                     f"{jnp.shape(tokens_BxT)} (expected logits = tokens shape + (V,))")
  logits_BxTxV = _f32(logits_BxTxV)
  picked_BxT = jnp.take_along_axis(logits_BxTxV, jnp.asarray(tokens_BxT)[..., None], axis=-1)[..., 0]
  return picked_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)


def entropy_from_logits(logits_BxTxV):
  """H_t = −Σ_v p_v log p_v with p = softmax(logits_t), in float32; −inf logits (p = 0) contribute 0."""
  logp_BxTxV = jax.nn.log_softmax(_f32(logits_BxTxV), axis=-1)
  p_BxTxV = jnp.exp(logp_BxTxV)
  return -jnp.sum(p_BxTxV * jnp.where(p_BxTxV > 0, logp_BxTxV, 0.0), axis=-1)


def kl_estimate(logp_BxT, ref_logp_BxT, estimator="k1"):
  """Per-token estimator of KL(π‖π_ref) from tokens sampled from π; with log r = ref_logp − logp:

  "k1": −log r = logp − ref_logp (unbiased, high variance, can be negative);
  "k2": ½ (log r)² (biased, low variance, ≥ 0);
  "k3": (r − 1) − log r = exp(ref_logp − logp) − 1 − (ref_logp − logp) (unbiased, ≥ 0).
  """
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"rl.kl_estimate: estimator={estimator!r}; expected one of {KL_ESTIMATORS}")
  _check_same_shape("kl_estimate", logp=logp_BxT, ref_logp=ref_logp_BxT)
  log_r = _f32(ref_logp_BxT) - _f32(logp_BxT)
  if estimator == "k1":
    return -log_r
  if estimator == "k2":
    return 0.5 * jnp.square(log_r)
  return jnp.expm1(log_r) - log_r


# ----------------------------------------------------------------------------------------------- masked stats


def masked_sum(x, mask, axis=None, keepdims=False):
  """Σ_{mask=1} x (float32)."""
  _check_same_shape("masked_sum", x=x, mask=mask)
  return jnp.sum(_zero_out(x, mask), axis=axis, keepdims=keepdims)


def masked_mean(x, mask, axis=None, keepdims=False):
  """Σ_{mask=1} x / Σ mask over `axis` (float32); 0 where there is no valid entry."""
  count = jnp.sum(_valid(mask), axis=axis, keepdims=keepdims).astype(jnp.float32)
  return masked_sum(x, mask, axis, keepdims) / jnp.maximum(count, 1.0)


def masked_var(x, mask, axis=None, keepdims=False):
  """Population variance over valid entries: mean_{mask=1} (x − mean_{mask=1} x)²."""
  mean = masked_mean(x, mask, axis, keepdims=True)
  return masked_mean(jnp.square(_zero_out(x, mask) - mean), mask, axis, keepdims)


def masked_whiten(x_BxT, mask_BxT):
  """(x − μ) / sqrt(σ² + 1e-8), μ and σ² the mean and population variance of all valid entries; 0 elsewhere."""
  mean = masked_mean(x_BxT, mask_BxT)
  var = masked_var(x_BxT, mask_BxT)
  return jnp.where(_valid(mask_BxT), (_zero_out(x_BxT, mask_BxT) - mean) * jax.lax.rsqrt(var + _WHITEN_EPS), 0.0)


def explained_variance(values, returns, mask):
  """1 − Var[R − V] / Var[R] over valid entries (population variances); 0 when Var[R] = 0 (undefined)."""
  _check_same_shape("explained_variance", values=values, returns=returns, mask=mask)
  var_r = masked_var(returns, mask)
  var_res = masked_var(_zero_out(returns, mask) - _zero_out(values, mask), mask)
  return jnp.where(var_r > 0, 1.0 - var_res / jnp.where(var_r > 0, var_r, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------- rewards, GAE


def last_valid_onehot(mask_BxT):
  """One-hot of the highest index with mask 1 in each row (all zeros for a row without valid tokens)."""
  valid_BxT = _valid(mask_BxT)
  T = valid_BxT.shape[-1]
  last_B = T - 1 - jnp.argmax(valid_BxT[..., ::-1], axis=-1)
  onehot_BxT = jnp.arange(T) == last_B[..., None]
  return onehot_BxT & jnp.any(valid_BxT, axis=-1, keepdims=True)


def shaped_rewards(score_B, kl_BxT, mask_BxT, kl_coef):
  """r_t = −β·kl_t on valid tokens, plus the RM score on each row's last valid token; 0 where mask is 0."""
  _check_same_shape("shaped_rewards", kl=kl_BxT, mask=mask_BxT)
  if jnp.shape(score_B) != jnp.shape(kl_BxT)[:1]:
    raise ValueError(f"rl.shaped_rewards: score shape {jnp.shape(score_B)} does not match batch of kl shape "
                     f"{jnp.shape(kl_BxT)}")
  last_BxT = last_valid_onehot(mask_BxT)
  rewards_BxT = -_f32(kl_coef) * _zero_out(kl_BxT, mask_BxT)
  return rewards_BxT + jnp.where(last_BxT, _f32(score_B)[:, None], 0.0)


def gae(values_BxT, rewards_BxT, mask_BxT, gamma, lam):
  """Generalized advantage estimation by a reverse `lax.scan` over T, skipping masked positions.

  Over each row's valid tokens t (in order, t' the next valid token):
    δ_t = r_t + γ·V_{t'} − V_t,  with V beyond the last valid token = 0;
    A_t = δ_t + γλ·A_{t'},       with A beyond the last valid token = 0;
    returns_t = A_t + V_t.
  Masked positions output 0 and pass the carry (V_{t'}, A_{t'}) through untouched, so they never leak.
  """
  _check_same_shape("gae", values=values_BxT, rewards=rewards_BxT, mask=mask_BxT)
  gamma, lam = _f32(gamma), _f32(lam)

  def step(carry, xs):
    next_value_B, next_adv_B = carry
    value_B, reward_B, valid_B = xs
    delta_B = reward_B + gamma * next_value_B - value_B
    adv_B = jnp.where(valid_B, delta_B + gamma * lam * next_adv_B, 0.0)
    carry = (jnp.where(valid_B, value_B, next_value_B), jnp.where(valid_B, adv_B, next_adv_B))
    return carry, adv_B

  values_TxB = _zero_out(values_BxT, mask_BxT).T
  xs = (values_TxB, _zero_out(rewards_BxT, mask_BxT).T, _valid(mask_BxT).T)
  zeros_B = jnp.zeros(values_TxB.shape[1], jnp.float32)
  _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B), xs, reverse=True)
  advantages_BxT = adv_TxB.T
  returns_BxT = jnp.where(_valid(mask_BxT), advantages_BxT + values_TxB.T, 0.0)
  return advantages_BxT, returns_BxT


def group_advantages(score_B, group_size, scale="group", eps=1e-4):
  """GRPO's group-relative advantage per response; rows g·G … g·G+G−1 are one prompt's group of G = group_size:

  A_i = (r_i − r̄_g) / (σ + eps), r̄_g the group mean and σ the Bessel-corrected std √(Σ(r − r̄)² / (n − 1)) of the
  group (scale="group": DeepSeekMath's GRPO, TRL's default) or of all B scores (scale="batch"; the centring stays
  per group); scale="none" (Dr. GRPO): A_i = r_i − r̄_g. A group whose scores are all equal gets A = 0.
  """
  if scale not in GROUP_SCALES:
    raise ValueError(f"rl.group_advantages: scale={scale!r}; expected one of {GROUP_SCALES}")
  shape, G = tuple(jnp.shape(score_B)), int(group_size)
  if len(shape) != 1 or G < 2 or shape[0] % G:
    raise ValueError(f"rl.group_advantages: score shape {shape} must be (B,) with B a multiple of group_size="
                     f"{group_size} >= 2")
  r_NxG = _f32(score_B).reshape(-1, G)
  centred_NxG = r_NxG - jnp.mean(r_NxG, axis=1, keepdims=True)
  if scale == "none":
    return centred_NxG.reshape(-1)
  std = jnp.std(r_NxG, axis=1, ddof=1, keepdims=True) if scale == "group" else jnp.std(r_NxG, ddof=1)
  return (centred_NxG / (std + eps)).reshape(-1)


# ----------------------------------------------------------------------------------------------- PPO losses


def ppo_policy_loss(logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT, clip_eps):
  """PPO clipped surrogate, token mean over valid tokens: ρ = exp(logp − old_logp),

  L = mean_t −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t).
  aux["clipfrac"]: fraction of valid tokens where the clipped term is strictly smaller (clipping active);
  aux["approx_kl"]: token mean of the k2 estimator ½(logp − old_logp)² of KL(π_old‖π) (samples from π_old).
  """
  _check_same_shape("ppo_policy_loss", logp=logp_BxT, old_logp=old_logp_BxT, advantages=advantages_BxT,
                    mask=mask_BxT)
  log_ratio_BxT = _zero_out(logp_BxT, mask_BxT) - _zero_out(old_logp_BxT, mask_BxT)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  adv_BxT = _zero_out(advantages_BxT, mask_BxT)
  unclipped_BxT = ratio_BxT * adv_BxT
  clipped_BxT = jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + clip_eps) * adv_BxT
  loss = masked_mean(-jnp.minimum(unclipped_BxT, clipped_BxT), mask_BxT)
  aux = {"clipfrac": masked_mean(clipped_BxT < unclipped_BxT, mask_BxT),
         "approx_kl": masked_mean(0.5 * jnp.square(log_ratio_BxT), mask_BxT)}
  return loss, aux


def policy_loss_sums(logp_BxT, old_logp_BxT, ref_logp_BxT, advantages_BxT, mask_BxT, rows_B, *, clip_low,
                     clip_high, kl_coef=0.0, loss_agg="bnpo", ratio_level="token", max_len=None):
  """(numerator, denominator, token sums) of `grpo_policy_loss` (see there), for a loss summed over devices or
  minibatches: loss = numerator / denominator. `rows_B` (0/1) marks the sequences the "grpo" and "dr_grpo"
  aggregations count (a dropped group's rows: 0); `ref_logp_BxT=None` leaves out the k3 term. Token sums over
  the valid tokens: "clipfrac_low", "clipfrac_high", "approx_kl", "kl" (k3; 0 without a reference)."""
  if loss_agg not in LOSS_AGGS:
    raise ValueError(f"rl.grpo_policy_loss: loss_agg={loss_agg!r}; expected one of {LOSS_AGGS}")
  if ratio_level not in RATIO_LEVELS:
    raise ValueError(f"rl.grpo_policy_loss: ratio_level={ratio_level!r}; expected one of {RATIO_LEVELS}")
  _check_same_shape("grpo_policy_loss", logp=logp_BxT, old_logp=old_logp_BxT, advantages=advantages_BxT,
                    mask=mask_BxT)
  valid_BxT = _valid(mask_BxT)
  log_ratio_BxT = _zero_out(logp_BxT, mask_BxT) - _zero_out(old_logp_BxT, mask_BxT)
  if ratio_level == "sequence":  # GSPO: log ρ_b = mean over the sequence's valid tokens of log ρ_t
    seq_BxT = jnp.broadcast_to(masked_mean(log_ratio_BxT, mask_BxT, axis=1, keepdims=True), log_ratio_BxT.shape)
    ratio_BxT = jnp.exp(jnp.where(valid_BxT, seq_BxT, 0.0))
  else:
    ratio_BxT = jnp.exp(log_ratio_BxT)
  adv_BxT = _zero_out(advantages_BxT, mask_BxT)
  unclipped_BxT = ratio_BxT * adv_BxT
  clipped_BxT = jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high) * adv_BxT
  loss_BxT = -jnp.minimum(unclipped_BxT, clipped_BxT)
  kl_BxT = jnp.zeros_like(loss_BxT)
  if ref_logp_BxT is not None:
    kl_BxT = jnp.where(valid_BxT, kl_estimate(_zero_out(logp_BxT, mask_BxT), _zero_out(ref_logp_BxT, mask_BxT),
                                              "k3"), 0.0)
    loss_BxT = loss_BxT + _f32(kl_coef) * kl_BxT
  rows_B = _f32(rows_B)
  if loss_agg == "grpo":
    num, den = jnp.sum(masked_mean(loss_BxT, mask_BxT, axis=1) * rows_B), jnp.sum(rows_B)
  elif loss_agg == "dr_grpo":
    num = masked_sum(loss_BxT, mask_BxT) / (mask_BxT.shape[1] if max_len is None else max_len)
    den = jnp.sum(rows_B)
  else:  # bnpo, dapo: every valid token of the batch weighs the same
    num, den = masked_sum(loss_BxT, mask_BxT), jnp.sum(valid_BxT).astype(jnp.float32)
  sums = {"clipfrac_low": masked_sum((ratio_BxT < 1.0 - clip_low) & (adv_BxT < 0), mask_BxT),
          "clipfrac_high": masked_sum((ratio_BxT > 1.0 + clip_high) & (adv_BxT > 0), mask_BxT),
          "approx_kl": masked_sum(0.5 * jnp.square(log_ratio_BxT), mask_BxT), "kl": masked_sum(kl_BxT, mask_BxT)}
  return num, den, sums


def grpo_policy_loss(logp_BxT, old_logp_BxT, ref_logp_BxT, advantages_B, mask_BxT, *, clip_low=0.2, clip_high=0.2,
                     kl_coef=0.0, loss_agg="grpo", ratio_level="token", max_len=None):
  """GRPO-family clipped surrogate with a k3 KL penalty; per valid token t of sequence b, ρ = exp(logp − old_logp):

  ℓ_bt = −min(ρ A_b, clip(ρ, 1 − clip_low, 1 + clip_high) A_b) + kl_coef·k3,
  k3 = exp(ref − logp) − (ref − logp) − 1 (KL(π‖π_ref), unbiased, ≥ 0; DeepSeekMath's estimator);
  loss_agg "grpo": mean_b (mean over b's valid tokens of ℓ_bt); "bnpo" and "dapo": mean over all valid tokens of
  the batch (DAPO's token-level loss); "dr_grpo": Σ_bt ℓ_bt / (B · max_len) (max_len None: T).
  ratio_level="sequence" (GSPO): ρ_b = exp(mean over b's valid tokens of (logp − old_logp)) for all of b's tokens.
  advantages_B may also be per token (BxT). aux (token means): "clipfrac_low" (ρ < 1 − clip_low where A < 0),
  "clipfrac_high" (ρ > 1 + clip_high where A > 0), "clipfrac" (their sum: clipping active), "approx_kl"
  (½(logp − old_logp)², k2 of KL(π_old‖π)), "kl" (k3 of KL(π‖π_ref)).
  """
  adv = jnp.asarray(advantages_B)
  adv_BxT = jnp.broadcast_to(adv[:, None], jnp.shape(mask_BxT)) if adv.ndim == 1 else adv
  rows_B = jnp.ones(jnp.shape(mask_BxT)[:1], jnp.float32)
  num, den, sums = policy_loss_sums(logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, mask_BxT, rows_B,
                                    clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef, loss_agg=loss_agg,
                                    ratio_level=ratio_level, max_len=max_len)
  n = jnp.maximum(jnp.sum(_valid(mask_BxT)).astype(jnp.float32), 1.0)
  aux = {k: v / n for k, v in sums.items()}
  aux["clipfrac"] = aux["clipfrac_low"] + aux["clipfrac_high"]
  return num / jnp.maximum(den, 1.0), aux


def ppo_value_loss(values_BxT, old_values_BxT, returns_BxT, mask_BxT, clip_eps):
  """Clipped value loss, token mean over valid tokens: V_c = V_old + clip(V − V_old, −ε, ε),

  L = mean_t ½·max((V_t − R_t)², (V_c,t − R_t)²);
  aux["vf_clipfrac"]: fraction of valid tokens where the clipped term is strictly larger (selected).
  """
  _check_same_shape("ppo_value_loss", values=values_BxT, old_values=old_values_BxT, returns=returns_BxT,
                    mask=mask_BxT)
  v_BxT, old_BxT = _zero_out(values_BxT, mask_BxT), _zero_out(old_values_BxT, mask_BxT)
  ret_BxT = _zero_out(returns_BxT, mask_BxT)
  v_clipped_BxT = old_BxT + jnp.clip(v_BxT - old_BxT, -clip_eps, clip_eps)
  unclipped_BxT = jnp.square(v_BxT - ret_BxT)
  clipped_BxT = jnp.square(v_clipped_BxT - ret_BxT)
  loss = masked_mean(0.5 * jnp.maximum(unclipped_BxT, clipped_BxT), mask_BxT)
  return loss, {"vf_clipfrac": masked_mean(clipped_BxT > unclipped_BxT, mask_BxT)}


# ----------------------------------------------------------------------------------------------- reward model


def bradley_terry_loss(chosen_B, rejected_B):
  """mean_b −log σ(s_chosen − s_rejected), via the stable `jax.nn.log_sigmoid`."""
  _check_same_shape("bradley_terry_loss", chosen=chosen_B, rejected=rejected_B)
  return jnp.mean(-jax.nn.log_sigmoid(_f32(chosen_B) - _f32(rejected_B)))


def pairwise_bradley_terry(scores_BxK, rank_BxK, valid_BxK):
  """Bradley-Terry over all C(K, 2) pairs of each prompt's K ranked responses (rank 0 = best):

  pairs (i, j) of one row with rank_i < rank_j and both valid (equal ranks form no pair);
  loss = mean over all pairs of the batch of −log σ(s_i − s_j).
  aux: "accuracy" (fraction with s_i > s_j), "margin" (mean s_i − s_j), "num_pairs" (int32).
  """
  _check_same_shape("pairwise_bradley_terry", scores=scores_BxK, rank=rank_BxK, valid=valid_BxK)
  valid_BxK = _valid(valid_BxK)
  s_BxK = _zero_out(scores_BxK, valid_BxK)
  rank_BxK = jnp.asarray(rank_BxK)
  pair_BxKxK = ((rank_BxK[:, :, None] < rank_BxK[:, None, :])
                & valid_BxK[:, :, None] & valid_BxK[:, None, :])
  diff_BxKxK = s_BxK[:, :, None] - s_BxK[:, None, :]
  loss = masked_mean(-jax.nn.log_sigmoid(diff_BxKxK), pair_BxKxK)
  aux = {"accuracy": masked_mean(diff_BxKxK > 0, pair_BxKxK),
         "margin": masked_mean(diff_BxKxK, pair_BxKxK),
         "num_pairs": jnp.sum(pair_BxKxK, dtype=jnp.int32)}
  return loss, aux


# ----------------------------------------------------------------------------------------------- KL control


def _finite_float(name, x):
  x = float(x)
  if not math.isfinite(x):
    raise ValueError(f"rl.{name}={x} must be finite")
  return x


class FixedKLController:
  """Constant KL coefficient β with the AdaptiveKLController interface."""

  def __init__(self, kl_coef: float):
    self.value = _finite_float("FixedKLController.kl_coef", kl_coef)
    if self.value < 0:
      raise ValueError(f"rl.FixedKLController.kl_coef={self.value} must be >= 0")

  def update(self, current_kl: float, n_steps: int) -> float:
    """No-op; returns β."""
    del current_kl, n_steps
    return self.value

  def state_dict(self) -> dict:
    return {"kind": "fixed", "value": self.value}

  def load_state_dict(self, d: dict) -> None:
    _check_state("FixedKLController", d, "fixed", ("value",))
    self.value = float(d["value"])


class AdaptiveKLController:
  """Adaptive β (Ziegler et al. 2019): e = clip(KL/target − 1, −0.2, 0.2);  β ← β·(1 + e·n_steps/horizon)."""

  def __init__(self, init_kl_coef: float, target: float, horizon: float):
    self.value = _finite_float("AdaptiveKLController.init_kl_coef", init_kl_coef)
    self.target = _finite_float("AdaptiveKLController.target", target)
    self.horizon = _finite_float("AdaptiveKLController.horizon", horizon)
    if self.value < 0:
      raise ValueError(f"rl.AdaptiveKLController.init_kl_coef={self.value} must be >= 0")
    if self.target <= 0:
      raise ValueError(f"rl.AdaptiveKLController.target={self.target} must be > 0")
    if self.horizon <= 0:
      raise ValueError(f"rl.AdaptiveKLController.horizon={self.horizon} must be > 0")

  def update(self, current_kl: float, n_steps: int) -> float:
    """β ← β·(1 + clip(current_kl/target − 1, ±0.2)·n_steps/horizon); returns the new β."""
    current_kl = _finite_float("AdaptiveKLController.update current_kl", current_kl)
    if n_steps < 0:
      raise ValueError(f"rl.AdaptiveKLController.update n_steps={n_steps} must be >= 0")
    error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
    self.value *= 1.0 + error * n_steps / self.horizon
    return self.value

  def state_dict(self) -> dict:
    return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

  def load_state_dict(self, d: dict) -> None:
    _check_state("AdaptiveKLController", d, "adaptive", ("value", "target", "horizon"))
    self.value, self.target, self.horizon = float(d["value"]), float(d["target"]), float(d["horizon"])


def _check_state(cls, d, kind, keys):
  missing = [k for k in ("kind",) + keys if k not in d]
  if missing:
    raise ValueError(f"rl.{cls}.load_state_dict: missing keys {missing} in {dict(d)}")
  if str(d["kind"]) != kind:
    raise ValueError(f"rl.{cls}.load_state_dict: kind={d['kind']!r}; expected {kind!r}")
