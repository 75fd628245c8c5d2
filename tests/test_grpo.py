"""GRPO family: group advantages and the GRPO/DAPO/Dr. GRPO/GSPO policy loss by hand, and the PPO options that use
them (advantage=grpo, loss_agg, kl_in=loss, clip-higher, sequence ratio, dynamic sampling) through the update."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fixtures
from rlhf_jax import checkpoint, metrics, parallel, ppo, rl, sampling

RNG = np.random.default_rng(0)
MASK_5x6 = np.array([[1, 1, 1, 0, 0, 0],  # right-padded, left-padded, a hole, full, one token
                     [0, 0, 1, 1, 1, 1],
                     [1, 1, 0, 1, 1, 0],
                     [1, 1, 1, 1, 1, 1],
                     [0, 0, 0, 1, 0, 0]], np.float32)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------- group advantages


def test_group_advantages_hand_values_incl_a_zero_std_group():
  score = np.array([1, 2, 3, 4, 5, 5, 5, 5, 0, 10, 0, 10], np.float32)
  a = np.asarray(rl.group_advantages(score, 4))
  # group 1: mean 2.5, Bessel std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3)
  _close(a[:4], np.array([-1.5, -0.5, 0.5, 1.5]) / (np.sqrt(5 / 3) + 1e-4))
  assert np.all(a[4:8] == 0.0)  # all equal: 0 / (0 + eps), not NaN
  _close(a[8:], np.array([-5, 5, -5, 5]) / (np.sqrt(100 / 3) + 1e-4))  # Bessel: 4 · 25 / 3
  groups = score.reshape(3, 4)
  centred = (groups - groups.mean(1, keepdims=True)).reshape(-1)
  _close(rl.group_advantages(score, 4, scale="batch"), centred / (np.std(score, ddof=1) + 1e-4))
  _close(rl.group_advantages(score, 4, scale="none"), centred)
  _close(rl.group_advantages(score, 2, eps=0.5),  # pairs: std of (a, b) is |a − b| / √2
         [(x - y) / 2 / (abs(x - y) / np.sqrt(2) + 0.5) for x, y in zip(score[0::2], score[1::2])
          for x, y in ((x, y), (y, x))])


@pytest.mark.parametrize("kwargs,match", [(dict(group_size=1), "group_size=1 >= 2"),
                                          (dict(group_size=5), "multiple of group_size=5"),
                                          (dict(group_size=2, scale="std"), "scale='std'")])
def test_group_advantages_validates(kwargs, match):
  with pytest.raises(ValueError, match=match):
    rl.group_advantages(np.zeros(8, np.float32), **kwargs)


# ------------------------------------------------------------------------------------------- GRPO policy loss


def _np_grpo(logp, old, ref, adv_B, mask, clip_low, clip_high, kl_coef, agg, level, max_len=None):
  """The GRPO-family loss written out in NumPy (float64)."""
  m = mask > 0
  n_B = np.maximum(m.sum(1), 1)
  lr = np.where(m, logp - old, 0.0)
  if level == "sequence":
    lr = np.repeat((lr.sum(1) / n_B)[:, None], mask.shape[1], 1)
  ratio, A = np.exp(lr), adv_B[:, None]
  d = ref - logp
  per = -np.minimum(ratio * A, np.clip(ratio, 1 - clip_low, 1 + clip_high) * A) + kl_coef * (np.exp(d) - d - 1)
  per = np.where(m, per, 0.0)
  if agg == "grpo":
    loss = np.mean(per.sum(1) / n_B)
  elif agg == "dr_grpo":
    loss = per.sum() / (mask.shape[0] * (max_len or mask.shape[1]))
  else:
    loss = per.sum() / m.sum()
  low = (ratio < 1 - clip_low) & (A < 0) & m
  high = (ratio > 1 + clip_high) & (A > 0) & m
  return loss, low.sum() / m.sum(), high.sum() / m.sum()


def test_grpo_aggregations_hand_values():
  """ratio 1 (logp = old), no KL: token losses −A. Sequence 0: A = 1, 1 token; sequence 1: A = −2, 3 tokens."""
  mask = np.array([[1, 0, 0, 0], [1, 1, 1, 0]], np.float32)
  lp = np.full((2, 4), -1.0, np.float32)
  adv = np.array([1.0, -2.0], np.float32)
  loss = lambda agg, **kw: float(rl.grpo_policy_loss(lp, lp, lp, adv, mask, loss_agg=agg, **kw)[0])
  assert loss("grpo") == pytest.approx((-1 + 2) / 2)  # mean of the sequence means −1 and 2
  assert loss("bnpo") == loss("dapo") == pytest.approx((-1 + 6) / 4)  # token mean
  assert loss("dr_grpo") == pytest.approx(5 / (2 * 4))  # sum / (B · T)
  assert loss("dr_grpo", max_len=10) == pytest.approx(5 / (2 * 10))


def test_grpo_clip_higher_both_sides_hand_values():
  """clip_low 0.2, clip_high 0.28 (DAPO); one sequence of six tokens, ratio and advantage per token."""
  ratio = np.array([1.25, 1.30, 0.75, 0.85, 1.30, 0.70])
  adv = np.array([1.0, 1.0, -1.0, -1.0, -1.0, 1.0])
  # by hand: 1.25 < 1.28 unclipped: −1.25; 1.30 > 1.28 with A > 0: −1.28 (high); 0.75 < 0.8 with A < 0: 0.8 (low);
  # 0.85 inside: 0.85; 1.30 with A < 0: min(−1.3, −1.28) = −1.3 → 1.3 (not clipped); 0.7 with A > 0: −0.7
  want = np.array([-1.25, -1.28, 0.8, 0.85, 1.3, -0.7])
  old = RNG.normal(size=(1, 6))
  logp = (old + np.log(ratio)).astype(np.float32)
  mask = np.ones((1, 6), np.float32)
  loss, aux = rl.grpo_policy_loss(logp, old.astype(np.float32), logp, adv[None].astype(np.float32), mask,
                                  clip_low=0.2, clip_high=0.28, loss_agg="bnpo")
  _close(loss, want.mean())
  _close(aux["clipfrac_high"], 1 / 6)
  _close(aux["clipfrac_low"], 1 / 6)
  _close(aux["clipfrac"], 2 / 6)
  _close(aux["approx_kl"], np.mean(0.5 * np.log(ratio) ** 2))
  assert float(aux["kl"]) == 0.0  # ref = logp
  sym, _ = rl.grpo_policy_loss(logp, old.astype(np.float32), logp, adv[None].astype(np.float32), mask,
                               loss_agg="bnpo")  # symmetric 0.2: token 0 is clipped to 1.2 too
  _close(sym, (want.sum() + 1.25 - 1.2 + 1.28 - 1.2) / 6)


def test_grpo_sequence_ratio_is_the_exp_of_the_mean_log_ratio():
  """GSPO: per-token ratios 2 and 0.5 average to log ρ = 0: the sequence loss is −A on both tokens, unclipped."""
  old = np.zeros((1, 3), np.float32)
  logp = np.log(np.array([[2.0, 0.5, 9.0]], np.float32))  # the third token is masked
  mask = np.array([[1, 1, 0]], np.float32)
  loss_seq, aux = rl.grpo_policy_loss(logp, old, logp, np.array([3.0], np.float32), mask, ratio_level="sequence")
  _close(loss_seq, -3.0)
  assert float(aux["clipfrac"]) == 0.0
  loss_tok, aux_tok = rl.grpo_policy_loss(logp, old, logp, np.array([3.0], np.float32), mask)
  _close(loss_tok, -(1.2 * 3 + 0.5 * 3) / 2)  # token level: 2 is clipped to 1.2
  _close(aux_tok["clipfrac_high"], 0.5)


def test_grpo_k3_term_hand_value():
  logp = np.array([[-1.0, -2.0]], np.float32)
  ref = np.array([[-1.5, -1.0]], np.float32)
  mask = np.ones((1, 2), np.float32)
  d = ref - logp  # k3 = e^d − d − 1 per token
  k3 = np.exp(d) - d - 1
  loss, aux = rl.grpo_policy_loss(logp, logp, ref, np.zeros(1, np.float32), mask, kl_coef=0.1)
  _close(loss, 0.1 * k3.mean())  # A = 0: only the KL term
  _close(aux["kl"], k3.mean())
  _close(aux["kl"], rl.kl_estimate(logp, ref, "k3").mean())


@pytest.mark.parametrize("agg", rl.LOSS_AGGS)
@pytest.mark.parametrize("level", rl.RATIO_LEVELS)
def test_grpo_policy_loss_matches_numpy(agg, level):
  logp = (0.3 * RNG.normal(size=MASK_5x6.shape)).astype(np.float32)
  old = (logp + 0.3 * RNG.normal(size=MASK_5x6.shape)).astype(np.float32)
  ref = (logp + 0.5 * RNG.normal(size=MASK_5x6.shape)).astype(np.float32)
  adv = RNG.normal(size=5).astype(np.float32)
  kw = dict(clip_low=0.1, clip_high=0.25, kl_coef=0.3, loss_agg=agg, ratio_level=level, max_len=8)
  loss, aux = rl.grpo_policy_loss(logp, old, ref, adv, MASK_5x6, **kw)
  want, low, high = _np_grpo(*(np.float64(x) for x in (logp, old, ref, adv)), MASK_5x6, 0.1, 0.25, 0.3, agg,
                             level, max_len=8)
  _close(loss, want)
  _close(aux["clipfrac_low"], low)
  _close(aux["clipfrac_high"], high)
  assert low + high > 0  # the random ratios do clip
  poisoned = [np.where(MASK_5x6 > 0, x, np.nan).astype(np.float32) for x in (logp, old, ref)]
  loss_p, aux_p = rl.grpo_policy_loss(*poisoned, adv, MASK_5x6, **kw)  # masked positions never leak
  assert float(loss_p) == float(loss) and float(aux_p["kl"]) == float(aux["kl"])
  grad = jax.grad(lambda x: rl.grpo_policy_loss(x, *poisoned[1:], adv, MASK_5x6, **kw)[0])(poisoned[0])
  assert np.isfinite(grad).all() and np.all(np.asarray(grad)[MASK_5x6 == 0] == 0)
  jitted = jax.jit(functools.partial(rl.grpo_policy_loss, **kw))(logp, old, ref, adv, MASK_5x6)[0]
  _close(jitted, loss, 1e-6)


def test_grpo_policy_loss_validates():
  x = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match="loss_agg='mean'"):
    rl.grpo_policy_loss(x, x, x, np.zeros(2), x, loss_agg="mean")
  with pytest.raises(ValueError, match="ratio_level='row'"):
    rl.grpo_policy_loss(x, x, x, np.zeros(2), x, ratio_level="row")


# ------------------------------------------------------------------------------------------- options: validation


@pytest.mark.parametrize("field,value,match", [
    ("advantage", "ppo", "ppo.advantage='ppo'"), ("loss_agg", "sum", "ppo.loss_agg='sum'"),
    ("kl_in", "both", "ppo.kl_in='both'"), ("ratio_level", "row", "ppo.ratio_level='row'"),
    ("scale_rewards", "std", "ppo.scale_rewards='std'"), ("clip_low", -0.1, "ppo.clip_low=-0.1 must be >= 0"),
    ("clip_high", -1.0, "ppo.clip_high=-1.0 must be >= 0"), ("clip_low", 1.0, "ppo.clip_low=1.0 must be < 1"),
    ("clip_eps", -0.2, "ppo.clip_eps=-0.2 must be >= 0")])
def test_ppo_options_are_validated_naming_the_field(field, value, match):
  cfg = ppo.config().ppo
  cfg.group_size = 2
  cfg[field] = value
  with pytest.raises(ValueError, match=match):
    ppo.Hyper.from_config(cfg)


@pytest.mark.parametrize("option", [dict(advantage="grpo"), dict(advantage="rloo"), dict(drop_equal_groups=True)])
def test_group_methods_need_group_size_two(option):
  cfg = ppo.config().ppo
  cfg.update(option)
  with pytest.raises(ValueError, match="ppo.group_size=1 must be >= 2 with ppo"):
    ppo.Hyper.from_config(cfg)


def test_empty_options_derive_todays_methods():
  cfg = ppo.config().ppo
  h = ppo.Hyper.from_config(cfg)
  assert (h.advantage, h.loss_agg, h.kl_in, h.clip_low, h.clip_high, h.critic) == ("gae", "bnpo", "reward", 0.2,
                                                                                    0.2, True)
  cfg.group_size = 4
  assert ppo.Hyper.from_config(cfg).advantage == "rloo"
  cfg.advantage = "grpo"
  h = ppo.Hyper.from_config(cfg)
  assert (h.loss_agg, h.kl_in, h.critic) == ("grpo", "loss", False)


# ------------------------------------------------------------------------------------------- through the update

from test_ppo import CFG, _nets  # noqa: E402  (the hand-made rollout of test_ppo)

MODELS = ppo.Models(CFG, CFG, CFG)
SCORES = np.array([1, 3, 2, 2, 0, 5, 4, 1], np.float32)  # groups of 2; the second is all equal
GRPO_VARIANTS = {
    "grpo_seq_batch_dropped": dict(loss_agg="grpo", ratio_level="sequence", scale_rewards="batch",
                                   drop_equal_groups=True, clip_high=0.28),
    "dr_grpo_token": dict(loss_agg="dr_grpo", scale_rewards="none", clip_low=0.1)}


def _grpo_hyper(**kw):
  return ppo.Hyper(kl_estimator="k1", gamma=1.0, lam=0.95, clip_eps=0.2, vf_clip=0.2, vf_coef=0.5, ptx_coef=0.0,
                   whiten_advantages=True, ppo_epochs=2, minibatches=1, group_size=2, advantage="grpo", **kw)


# ------------------------------------------------------------------------------------------- toy reward rises

X, P_TOY, T_TOY, B_TOY, G_TOY, ITERS = 5, 4, 8, 32, 4, 8


def test_grpo_raises_a_toy_reward():
  """GRPO (group 4, k3 in the loss, β small) on the count of token X in the response: the mean count rises."""
  hyper = dataclasses.replace(_grpo_hyper(), minibatches=2, group_size=G_TOY)
  tx = optax.adam(1e-2)
  mesh = parallel.make_mesh()
  policy, _, _ = _nets(seed=1)
  params = ppo.Trainable(policy=policy, value=None)
  rep = lambda t: parallel.shard_tree(t, jax.tree.map(lambda _: parallel.replicated(mesh), t))
  state = rep(ppo.PPOState(jnp.int32(0), params, tx.init(params), jax.random.PRNGKey(0)))
  sampler = sampling.make_sampler(mesh, CFG, max_new_tokens=T_TOY, eos_id=3, pad_id=0)
  p_score, p_update = ppo.compile_steps(mesh, jax.tree.map(lambda _: parallel.replicated(mesh), state), tx, MODELS,
                                        hyper)
  frozen = rep(ppo.Frozen(ref=policy, reward=None))
  beta, zero = np.float32(0.01), np.float32(0.0)
  rng, scores = np.random.default_rng(0), []
  for it in range(ITERS + 1):
    prompts = np.repeat(rng.integers(4, CFG.vocab_size, (B_TOY // G_TOY, P_TOY)).astype(np.int32), G_TOY, axis=0)
    prompts = parallel.put_batch(mesh, prompts)
    samples = sampler(state.params.policy, prompts, jnp.ones_like(prompts), jax.random.PRNGKey(it))
    host = parallel.to_host(samples)
    score = np.sum((host.tokens_BxT == X) * host.mask_BxT, -1).astype(np.float32)
    scores.append(float(score.mean()))
    rollout, _ = p_score(state.params, frozen, samples, beta, zero, parallel.put_batch(mesh, score))
    if it < ITERS:
      state, _ = p_update(state, rollout, None, beta)
  assert scores[0] < 1.0 and np.mean(scores[-2:]) > scores[0] + 4.0, scores  # measured: 0.34 -> 7.9


# ------------------------------------------------------------------------------------------- ppo.run: resume


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return fixtures.pipeline(tmp_path_factory)


def test_grpo_run_resumes_bit_exact(pipe, tmp_path):
  """ppo.run with GRPO + DAPO's options (clip-higher, dynamic sampling) + GSPO's sequence ratio and a discrete reward
  function: 3 iterations at once == a run stopped by a NaN at iteration 3 (checkpoint at 2), then rerun."""
  def cfg(nan_at_step=-1):
    c = fixtures.ppo_cfg(pipe, pipe["sft"], "", steps=3)
    c.ppo.update(advantage="grpo", group_size=2, clip_high=0.28, drop_equal_groups=True, ratio_level="sequence",
                 value_init="sft")
    c.opt.lr, c.train.nan_at_step = 1e-3, nan_at_step
    return c

  reward = lambda prompts, responses: np.array([len(r) % 3 for r in responses], np.float32)  # ties: dropped groups
  ppo.run(cfg(), str(tmp_path / "a"), reward_fn=reward)
  with pytest.raises(metrics.NonFiniteLossError, match="3"):
    ppo.run(cfg(nan_at_step=3), str(tmp_path / "b"), reward_fn=reward)
  ppo.run(cfg(), str(tmp_path / "b"), reward_fn=reward)
  pa, pb = (checkpoint.load_params(str(tmp_path / d))[0] for d in ("a", "b"))
  assert pa.get("value") is None
  fixtures.close_trees(pa, pb, 0.0)
  keys = ("score", "kl", "loss_kl", "clipfrac_low", "clipfrac_high", "dropped_groups", "policy_loss")
  rows = {d: [{k: r[k] for k in ("step",) + keys} for r in metrics.read_jsonl(str(tmp_path / d / "metrics.jsonl"))]
          for d in ("a", "b")}
  assert [r["step"] for r in rows["b"]] == [1, 2, 3] and rows["a"] == rows["b"]
  assert any(r["dropped_groups"] > 0 for r in rows["a"]), rows["a"]
