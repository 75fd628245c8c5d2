"""RL math: hand-computed values, GAE == a plain Python loop, jit == eager, masks never leak, KL controllers."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import rl

RNG = np.random.default_rng(0)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# Right-padded, left-padded, both, a hole in the middle, fully valid, empty.
MASK_6x7 = np.array([[1, 1, 1, 1, 0, 0, 0],
                     [0, 0, 1, 1, 1, 1, 1],
                     [0, 1, 1, 1, 1, 0, 0],
                     [1, 1, 0, 1, 1, 1, 0],
                     [1, 1, 1, 1, 1, 1, 1],
                     [0, 0, 0, 0, 0, 0, 0]], np.float32)


# ------------------------------------------------------------------------------------------------ log-probs


def test_token_logprobs_matches_numpy_log_softmax():
  logits = RNG.normal(size=(2, 3, 5)).astype(np.float32) * 3
  tokens = RNG.integers(0, 5, size=(2, 3))
  want = np.take_along_axis(_np_log_softmax(logits.astype(np.float64)), tokens[..., None], -1)[..., 0]
  _close(rl.token_logprobs(logits, tokens), want)
  logits_bf16 = jnp.asarray(logits, jnp.bfloat16)  # computed in float32 from the bf16 values
  want_bf16 = np.take_along_axis(_np_log_softmax(np.asarray(logits_bf16, np.float64)), tokens[..., None], -1)
  out_bf16 = rl.token_logprobs(logits_bf16, tokens)
  assert out_bf16.dtype == jnp.float32 and out_bf16.shape == (2, 3)
  _close(out_bf16, want_bf16[..., 0])


def test_token_logprobs_hand_value_and_shape_error():
  logits = np.array([[[0.0, math.log(3.0)]]], np.float32)  # p = [1/4, 3/4]
  _close(rl.token_logprobs(logits, np.array([[1]])), [[math.log(0.75)]])
  _close(rl.token_logprobs(logits, np.array([[0]])), [[math.log(0.25)]])
  with pytest.raises(ValueError, match="token_logprobs"):
    rl.token_logprobs(np.zeros((2, 3, 5)), np.zeros((2, 4), np.int32))


def test_entropy_from_logits():
  logits = RNG.normal(size=(2, 4, 6)).astype(np.float32)
  logp = _np_log_softmax(logits.astype(np.float64))
  _close(rl.entropy_from_logits(logits), -(np.exp(logp) * logp).sum(-1))
  _close(rl.entropy_from_logits(np.zeros((1, 1, 8), np.float32)), [[math.log(8)]])
  # -inf logits (filtered vocab) have p = 0 and add nothing: uniform over the 2 finite entries.
  filtered = np.array([[[1.0, -np.inf, 1.0, -np.inf]]], np.float32)
  _close(rl.entropy_from_logits(filtered), [[math.log(2)]])


def test_kl_estimators_hand_values():
  logp = np.array([[-1.0, -2.0, -0.5]], np.float32)
  ref = np.array([[-1.5, -1.0, -0.5]], np.float32)
  d = logp.astype(np.float64) - ref
  _close(rl.kl_estimate(logp, ref), d)
  _close(rl.kl_estimate(logp, ref, "k1"), d)
  _close(rl.kl_estimate(logp, ref, "k2"), 0.5 * d ** 2)
  _close(rl.kl_estimate(logp, ref, "k3"), np.exp(-d) - 1 + d)
  with pytest.raises(ValueError, match=r"estimator='k4'.*'k1', 'k2', 'k3'"):
    rl.kl_estimate(logp, ref, "k4")


def test_k1_k3_unbiased_for_categorical_kl():
  """Monte Carlo means of k1 and k3 over samples from π match the exact KL(π‖π_ref)."""
  p = np.array([0.5, 0.2, 0.2, 0.1])
  q = np.array([0.25, 0.25, 0.25, 0.25])
  exact = float((p * np.log(p / q)).sum())
  idx = np.random.default_rng(1).choice(4, size=200_000, p=p)
  logp, ref = np.log(p)[idx][None].astype(np.float32), np.log(q)[idx][None].astype(np.float32)
  for est in ("k1", "k3"):
    assert abs(float(jnp.mean(rl.kl_estimate(logp, ref, est))) - exact) < 5e-3, est
  assert float(jnp.min(rl.kl_estimate(logp, ref, "k3"))) >= 0


# ------------------------------------------------------------------------------------------------ masked stats


def test_masked_mean_var_whiten():
  x = RNG.normal(size=MASK_6x7.shape).astype(np.float32)
  m = MASK_6x7.astype(bool)
  vals = x[m].astype(np.float64)
  _close(rl.masked_mean(x, MASK_6x7), vals.mean())
  _close(rl.masked_var(x, MASK_6x7), vals.var())  # population variance (ddof=0)
  want = np.where(m, (x - vals.mean()) / np.sqrt(vals.var() + 1e-8), 0.0)
  _close(rl.masked_whiten(x, MASK_6x7), want)
  rows_mean = [x[b][m[b]].mean() if m[b].any() else 0.0 for b in range(6)]
  rows_var = [x[b][m[b]].var() if m[b].any() else 0.0 for b in range(6)]
  _close(rl.masked_mean(x, MASK_6x7, axis=1), rows_mean)
  _close(rl.masked_var(x, MASK_6x7, axis=1), rows_var)
  assert rl.masked_mean(x, MASK_6x7, axis=1, keepdims=True).shape == (6, 1)
  assert float(rl.masked_mean(x, np.zeros_like(x))) == 0.0


def test_masked_mean_hand_value():
  x = np.array([[1.0, 2.0, 100.0], [3.0, 100.0, 6.0]], np.float32)
  m = np.array([[1, 1, 0], [1, 0, 1]])
  assert float(rl.masked_mean(x, m)) == pytest.approx(3.0)  # (1 + 2 + 3 + 6) / 4
  assert float(rl.masked_var(x, m)) == pytest.approx(3.5)  # (4 + 1 + 0 + 9) / 4


def test_explained_variance():
  v = RNG.normal(size=MASK_6x7.shape).astype(np.float32)
  r = v + 0.3 * RNG.normal(size=v.shape).astype(np.float32)
  m = MASK_6x7.astype(bool)
  want = 1 - np.var((r - v)[m].astype(np.float64)) / np.var(r[m].astype(np.float64))
  _close(rl.explained_variance(v, r, MASK_6x7), want)
  _close(rl.explained_variance(r, r, MASK_6x7), 1.0)
  # Hand value: R = [0, 2], V = [1, 1]: Var[R] = 1, Var[R − V] = Var[-1, 1] = 1 -> 0.
  _close(rl.explained_variance(np.array([1.0, 1.0]), np.array([0.0, 2.0]), np.ones(2)), 0.0)
  assert float(rl.explained_variance(v, np.ones_like(v), MASK_6x7)) == 0.0  # Var[R] = 0: defined as 0


# ------------------------------------------------------------------------------------------------ rewards, GAE


def test_shaped_rewards_hand():
  kl = RNG.normal(size=MASK_6x7.shape).astype(np.float32)
  score = np.arange(1, 7, dtype=np.float32)
  want = np.where(MASK_6x7 > 0, -0.5 * kl, 0.0)
  for b, last in enumerate([3, 6, 4, 5, 6, None]):  # highest index with mask 1, by reading MASK_6x7
    if last is not None:
      want[b, last] += score[b]
  _close(rl.shaped_rewards(score, kl, MASK_6x7, 0.5), want)
  with pytest.raises(ValueError, match="shaped_rewards"):
    rl.shaped_rewards(score[:2], kl, MASK_6x7, 0.5)


def _gae_loop(values, rewards, mask, gamma, lam):
  adv, ret = np.zeros(values.shape), np.zeros(values.shape)
  for b in range(values.shape[0]):
    next_v = next_a = 0.0
    for t in reversed([t for t in range(values.shape[1]) if mask[b, t]]):
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      adv[b, t] = delta + gamma * lam * next_a
      ret[b, t] = adv[b, t] + values[b, t]
      next_v, next_a = values[b, t], adv[b, t]
  return adv, ret


def test_gae_hand_values_left_and_right_padded():
  # V = [1, 2, 3], r = [0, 0, 1], γ = λ = 0.5:
  # δ2 = 1 − 3 = −2, A2 = −2;  δ1 = 0.5·3 − 2 = −0.5, A1 = −0.5 + 0.25·(−2) = −1;
  # δ0 = 0.5·2 − 1 = 0, A0 = 0.25·(−1) = −0.25;  returns = A + V = [0.75, 1, 1].
  values = np.array([[1, 2, 3, 9], [9, 1, 2, 3]], np.float32)
  rewards = np.array([[0, 0, 1, 7], [7, 0, 0, 1]], np.float32)
  mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float32)
  adv, ret = rl.gae(values, rewards, mask, 0.5, 0.5)
  _close(adv, [[-0.25, -1, -2, 0], [0, -0.25, -1, -2]])
  _close(ret, [[0.75, 1, 1, 0], [0, 0.75, 1, 1]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (1.0, 1.0)])
def test_gae_matches_python_loop(gamma, lam):
  values = RNG.normal(size=MASK_6x7.shape).astype(np.float32)
  rewards = RNG.normal(size=MASK_6x7.shape).astype(np.float32)
  adv, ret = rl.gae(values, rewards, MASK_6x7, gamma, lam)
  want_adv, want_ret = _gae_loop(values, rewards, MASK_6x7, gamma, lam)
  _close(adv, want_adv)
  _close(ret, want_ret)
  if gamma == lam == 1.0:  # Monte Carlo: returns are the rewards-to-go over valid tokens.
    to_go = np.where(MASK_6x7 > 0, np.cumsum((rewards * MASK_6x7)[:, ::-1], 1)[:, ::-1], 0)
    _close(ret, to_go)


def test_gae_random_masks_left_and_right_padding():
  B, T = 16, 11
  lengths = RNG.integers(0, T + 1, size=B)
  starts = RNG.integers(0, T + 1 - lengths)
  mask = np.zeros((B, T), np.float32)
  for b in range(B):
    mask[b, starts[b]:starts[b] + lengths[b]] = 1
  values = RNG.normal(size=(B, T)).astype(np.float32)
  rewards = RNG.normal(size=(B, T)).astype(np.float32)
  adv, ret = jax.jit(rl.gae)(values, rewards, mask, 0.97, 0.9)
  want_adv, want_ret = _gae_loop(values, rewards, mask, 0.97, 0.9)
  _close(adv, want_adv)
  _close(ret, want_ret)


# ------------------------------------------------------------------------------------------------ PPO losses


def test_ppo_policy_loss_clipfrac_both_signs():
  eps = 0.2
  ratio = np.array([1.5, 0.5, 1.1, 1.5, 0.5, 1.1, 0.5, 1.5], np.float64)
  adv = np.array([2.0, 2.0, 2.0, -1.0, -1.0, -1.0, 3.0, 3.0])
  # Clipping active (clipped term strictly smaller in the min) by hand:
  #   A > 0: ρ = 1.5 -> 1.2A < 1.5A active; ρ = 0.5 -> 0.5A < 0.8A not; ρ = 1.1 inside the range, not.
  #   A < 0: ρ = 1.5 -> −1.5|A| < −1.2|A| not; ρ = 0.5 -> −0.8|A| < −0.5|A| active; ρ = 1.1 not.
  #   The last two tokens are masked out.
  active = np.array([1, 0, 0, 0, 1, 0])
  mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
  old = np.array([-1.0, -2.0, -0.3, -0.7, -1.2, -0.1, -0.5, -0.5])
  logp = old + np.log(ratio)
  terms = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv)[:6]
  # Per-token losses by hand: [-2.4, -1.0, -2.2, 1.5, 0.8, 1.1] -> mean −2.2 / 6.
  np.testing.assert_allclose(terms, [-2.4, -1.0, -2.2, 1.5, 0.8, 1.1])
  loss, aux = rl.ppo_policy_loss(logp[None].astype(np.float32), old[None].astype(np.float32),
                                 adv[None].astype(np.float32), mask[None], eps)
  _close(loss, -2.2 / 6)
  _close(aux["clipfrac"], active.mean())
  _close(aux["approx_kl"], np.mean(0.5 * np.log(ratio[:6]) ** 2))


def test_ppo_policy_loss_token_mean_over_batch():
  """Token-level mean: a long row weighs more than a short row (not a mean of per-row means)."""
  logp = RNG.normal(size=MASK_6x7.shape).astype(np.float32) * 0.1
  old = RNG.normal(size=MASK_6x7.shape).astype(np.float32) * 0.1
  adv = RNG.normal(size=MASK_6x7.shape).astype(np.float32)
  m = MASK_6x7 > 0
  r = np.exp(logp.astype(np.float64) - old)
  per_tok = -np.minimum(r * adv, np.clip(r, 0.9, 1.1) * adv)
  loss, aux = rl.ppo_policy_loss(logp, old, adv, MASK_6x7, 0.1)
  _close(loss, per_tok[m].mean())
  unclipped, clipped = r * adv, np.clip(r, 0.9, 1.1) * adv
  _close(aux["clipfrac"], (clipped < unclipped)[m].mean())


def test_ppo_value_loss_hand():
  eps = 0.5
  old = np.array([[0.0, 0.0, 1.0, 0.0, 0.1, 5.0]], np.float32)
  v = np.array([[1.0, 1.0, 0.2, -2.0, 0.3, 9.0]], np.float32)
  ret = np.array([[2.0, 0.0, 0.0, -2.0, 0.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
  # V_clipped = old + clip(V − old, ±0.5) = [0.5, 0.5, 0.5, -0.5, 0.3]
  # (V−R)² = [1, 1, 0.04, 0, 0.09];  (V_c−R)² = [2.25, 0.25, 0.25, 2.25, 0.09]
  # max = [2.25, 1, 0.25, 2.25, 0.09]; loss = ½·5.84/5; clipped term strictly larger on tokens 0, 2, 3.
  loss, aux = rl.ppo_value_loss(v, old, ret, mask, eps)
  _close(loss, 0.5 * 5.84 / 5)
  _close(aux["vf_clipfrac"], 3 / 5)


# ------------------------------------------------------------------------------------------------ reward model


def test_bradley_terry_loss_hand_and_stable():
  chosen = np.array([1.0, 0.0, 3.0], np.float32)
  rejected = np.array([0.0, 0.0, -1.0], np.float32)
  want = np.mean([math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(-4.0))])
  _close(rl.bradley_terry_loss(chosen, rejected), want)
  big = rl.bradley_terry_loss(np.array([0.0, 0.0], np.float32), np.array([1000.0, -1000.0], np.float32))
  _close(big, 500.0)  # (1000 + 0) / 2, finite
  g = jax.grad(rl.bradley_terry_loss)(jnp.array([-1000.0]), jnp.array([1000.0]))
  assert np.isfinite(np.asarray(g)).all()


def _pairwise_loop(scores, rank, valid):
  losses, correct, margins = [], [], []
  for b in range(scores.shape[0]):
    for i in range(scores.shape[1]):
      for j in range(scores.shape[1]):
        if valid[b, i] and valid[b, j] and rank[b, i] < rank[b, j]:
          d = float(scores[b, i]) - float(scores[b, j])
          losses.append(-_np_log_sigmoid(d))
          correct.append(d > 0)
          margins.append(d)
  return np.mean(losses), np.mean(correct), np.mean(margins), len(losses)


def test_pairwise_bradley_terry_hand():
  # Row 0: K = 3 ranked 0 < 1 < 2 -> pairs (0,1), (0,2), (1,2) with d = 1, 3, 2 (all correct).
  # Row 1: responses 0 and 2 tie at rank 0 (no pair), response 1 rank 1, response 3 invalid:
  #   pairs (0,1) d = −1 (wrong), (2,1) d = 0.5 (correct).
  scores = np.array([[2.0, 1.0, -1.0, 0.0], [0.0, 1.0, 1.5, 50.0]], np.float32)
  rank = np.array([[0, 1, 2, 3], [0, 1, 0, 0]])
  valid = np.array([[1, 1, 1, 0], [1, 1, 1, 0]])
  d = np.array([1.0, 3.0, 2.0, -1.0, 0.5])
  loss, aux = rl.pairwise_bradley_terry(scores, rank, valid)
  _close(loss, np.mean(-_np_log_sigmoid(d)))
  _close(aux["accuracy"], 4 / 5)
  _close(aux["margin"], d.mean())
  assert int(aux["num_pairs"]) == 5


def test_pairwise_bradley_terry_random_and_k2_equals_bt():
  B, K = 5, 4
  scores = RNG.normal(size=(B, K)).astype(np.float32)
  rank = RNG.integers(0, 3, size=(B, K))  # ties included
  valid = RNG.integers(0, 2, size=(B, K))
  valid[0] = 1
  loss, aux = rl.pairwise_bradley_terry(scores, rank, valid)
  want_loss, want_acc, want_margin, want_n = _pairwise_loop(scores, rank, valid)
  _close(loss, want_loss)
  _close(aux["accuracy"], want_acc)
  _close(aux["margin"], want_margin)
  assert int(aux["num_pairs"]) == want_n
  chosen, rejected = scores[:, 0], scores[:, 1]
  pair_loss, _ = rl.pairwise_bradley_terry(scores[:, :2], np.tile([0, 1], (B, 1)), np.ones((B, 2)))
  _close(pair_loss, rl.bradley_terry_loss(chosen, rejected))


# ------------------------------------------------------------------------------------------------ jit, masks


def _cases():
  """(name, fn, args, indices of args that share the mask, index of the mask) for every masked function."""
  s = MASK_6x7.shape
  x = lambda: RNG.normal(size=s).astype(np.float32)  # noqa: E731
  score = RNG.normal(size=s[:1]).astype(np.float32)
  sc, rk, vd = (RNG.normal(size=(4, 5)).astype(np.float32), RNG.integers(0, 4, size=(4, 5)),
                RNG.integers(0, 2, size=(4, 5)))
  return [
      ("masked_mean", rl.masked_mean, (x(), MASK_6x7), (0,), 1),
      ("masked_var", rl.masked_var, (x(), MASK_6x7), (0,), 1),
      ("masked_whiten", rl.masked_whiten, (x(), MASK_6x7), (0,), 1),
      ("explained_variance", rl.explained_variance, (x(), x(), MASK_6x7), (0, 1), 2),
      ("shaped_rewards", rl.shaped_rewards, (score, x(), MASK_6x7, 0.1), (1,), 2),
      ("gae", rl.gae, (x(), x(), MASK_6x7, 0.99, 0.95), (0, 1), 2),
      ("ppo_policy_loss", rl.ppo_policy_loss, (0.3 * x(), 0.3 * x(), x(), MASK_6x7, 0.2), (0, 1, 2), 3),
      ("ppo_value_loss", rl.ppo_value_loss, (x(), x(), x(), MASK_6x7, 0.2), (0, 1, 2), 3),
      ("pairwise_bradley_terry", rl.pairwise_bradley_terry, (sc, rk, vd), (0, 1), 2),
  ]


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_masked_positions_never_leak(case):
  _, fn, args, masked_args, mask_i = case
  base = fn(*args)
  invalid = np.asarray(args[mask_i]) == 0
  for fill in (1e6, np.nan, -np.inf):
    changed = list(args)
    for i in masked_args:
      a = np.array(args[i])
      a[invalid] = fill if a.dtype.kind == "f" else 3
      changed[i] = a
    jax.tree.map(lambda u, w: np.testing.assert_array_equal(np.asarray(u), np.asarray(w)), base, fn(*changed))


@pytest.mark.parametrize("name", ["masked_whiten", "gae", "ppo_policy_loss", "ppo_value_loss",
                                  "pairwise_bradley_terry"])
def test_gradients_zero_and_finite_at_masked_positions(name):
  _, fn, args, masked_args, mask_i = next(c for c in CASES if c[0] == name)
  invalid = np.asarray(args[mask_i]) == 0
  float_args = [i for i in masked_args if np.asarray(args[i]).dtype.kind == "f"]
  poisoned = [np.where(invalid, np.nan, args[i]) if i in float_args else args[i] for i in range(len(args))]

  def scalar(*fargs):
    full = list(poisoned)
    for i, a in zip(float_args, fargs):
      full[i] = a
    return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(fn(*full)) if leaf.dtype == jnp.float32)

  grads = jax.grad(scalar, argnums=tuple(range(len(float_args))))(*[poisoned[i] for i in float_args])
  for g in grads:
    g = np.asarray(g)
    assert np.isfinite(g).all()
    assert (g[invalid] == 0).all()
    assert np.abs(g[~invalid]).max() > 0


def _jit_cases():
  logits = RNG.normal(size=(3, 4, 7)).astype(np.float32)
  tokens = RNG.integers(0, 7, size=(3, 4))
  lp, ref = RNG.normal(size=(3, 4)).astype(np.float32), RNG.normal(size=(3, 4)).astype(np.float32)
  out = [(c[0], c[1], c[2], ()) for c in CASES]
  out += [("token_logprobs", rl.token_logprobs, (logits, tokens), ()),
          ("entropy_from_logits", rl.entropy_from_logits, (logits,), ()),
          ("bradley_terry_loss", rl.bradley_terry_loss, (lp[:, 0], ref[:, 0]), ())]
  out += [(f"kl_estimate_{e}", rl.kl_estimate, (lp, ref, e), (2,)) for e in rl.KL_ESTIMATORS]
  return out


JIT_CASES = _jit_cases()


@pytest.mark.parametrize("case", JIT_CASES, ids=[c[0] for c in JIT_CASES])
def test_jit_equals_eager(case):
  _, fn, args, static = case
  eager = fn(*args)
  jitted = jax.jit(fn, static_argnums=static)(*args)
  jax.tree.map(lambda u, w: np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-6, atol=1e-6),
               eager, jitted)


def test_scalar_hyperparameters_can_be_traced():
  """kl_coef, γ, λ and clip ε may be traced arrays, so a new KL coefficient never recompiles."""
  _, fn, args, _, _ = next(c for c in CASES if c[0] == "gae")
  adv_a, _ = jax.jit(lambda g, l: fn(args[0], args[1], args[2], g, l))(0.9, 0.8)
  adv_b, _ = fn(args[0], args[1], args[2], 0.9, 0.8)
  _close(adv_a, adv_b)
  kl = np.ones_like(MASK_6x7)
  f = jax.jit(lambda c: rl.shaped_rewards(np.zeros(6, np.float32), kl, MASK_6x7, c))
  _close(f(0.25), -0.25 * MASK_6x7)


# ------------------------------------------------------------------------------------------------ KL control


def test_adaptive_kl_controller_trajectory():
  ctl = rl.AdaptiveKLController(0.2, target=6.0, horizon=10000)
  kls = [6.0, 12.0, 0.0, 6.6, 5.7]
  got = [ctl.update(kl, 512) for kl in kls]
  # Hand: errors clip(kl/6 − 1, ±0.2) = [0, 0.2, −0.2, 0.1, −0.05]; factor 1 + e·512/10000.
  want, value = [], 0.2
  for e in [0.0, 0.2, -0.2, 0.1, -0.05]:
    value *= 1 + e * 0.0512
    want.append(value)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert ctl.value == got[-1]
  assert got[1] == pytest.approx(0.2 * 1.01024)


def test_kl_controllers_state_round_trip_exact():
  ctl = rl.AdaptiveKLController(0.1, target=2.0, horizon=300)
  for kl in (3.0, 2.5, 0.7):
    ctl.update(kl, 64)
  saved = json.loads(json.dumps(ctl.state_dict()))  # the checkpoint's `extra` is JSON
  fresh = rl.AdaptiveKLController(0.5, target=1.0, horizon=10)
  fresh.load_state_dict(saved)
  assert (fresh.value, fresh.target, fresh.horizon) == (ctl.value, 2.0, 300.0)
  assert fresh.update(4.0, 64) == ctl.update(4.0, 64)
  fixed = rl.FixedKLController(0.05)
  assert fixed.update(100.0, 64) == 0.05 and fixed.value == 0.05
  other = rl.FixedKLController(0.3)
  other.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
  assert other.value == 0.05
  with pytest.raises(ValueError, match="kind"):
    other.load_state_dict(saved)
  with pytest.raises(ValueError, match="missing keys"):
    fresh.load_state_dict({"kind": "adaptive", "value": 1.0})


@pytest.mark.parametrize("kwargs,match", [
    (dict(init_kl_coef=0.1, target=0.0, horizon=10), "target=0.0 must be > 0"),
    (dict(init_kl_coef=0.1, target=-1.0, horizon=10), "target=-1.0 must be > 0"),
    (dict(init_kl_coef=0.1, target=1.0, horizon=0), "horizon=0.0 must be > 0"),
    (dict(init_kl_coef=-0.1, target=1.0, horizon=10), "init_kl_coef=-0.1 must be >= 0"),
    (dict(init_kl_coef=0.1, target=float("nan"), horizon=10), "target=nan must be finite"),
])
def test_adaptive_kl_controller_validates(kwargs, match):
  with pytest.raises(ValueError, match=match):
    rl.AdaptiveKLController(**kwargs)


def test_kl_controller_update_validates():
  ctl = rl.AdaptiveKLController(0.1, 1.0, 10)
  with pytest.raises(ValueError, match="current_kl=nan"):
    ctl.update(float("nan"), 1)
  with pytest.raises(ValueError, match="n_steps=-1"):
    ctl.update(1.0, -1)
  with pytest.raises(ValueError, match="kl_coef=-1.0"):
    rl.FixedKLController(-1.0)
