"""Pure RL math for PPO-ptx and the reward model: log-probs, KL estimators, shaped rewards, GAE, PPO losses.

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
