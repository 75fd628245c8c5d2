"""DPO family: every loss type by hand (NumPy), and the DPO stage on the shared trainer (lr = 0 keeps SFT, accuracy
rises on easy comparisons, resume is bit-exact, init_from must be a policy workdir, 4 devices == 1 device)."""
import math
import os

import numpy as np
import pytest

import fixtures
from rlhf_jax import checkpoint, dpo, losses, metrics, stages

C = np.array([-3.0, -5.0, -2.0, -8.0])  # log π(chosen), summed over response tokens
R = np.array([-4.0, -4.5, -6.0, -7.0])
RC = np.array([-3.5, -5.0, -2.5, -7.0])  # reference
RR = np.array([-3.5, -4.0, -5.0, -8.0])
NC, NR = np.array([2, 5, 1, 4]), np.array([3, 2, 4, 4])  # response token counts
BETA = 0.5


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _loss(loss_type, **kw):
  f32 = lambda x: np.asarray(x, np.float32)
  return losses.dpo_loss(f32(C), f32(R), f32(RC), f32(RR), beta=BETA, loss_type=loss_type, chosen_len_B=NC,
                         rejected_len_B=NR, **kw)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


def test_sigmoid_hinge_robust_hand_values():
  h = (C - RC) - (R - RR)
  _close(h, [0.5 + 0.5, 0.0 + 0.5, 0.5 + 1.0, -1.0 - 1.0])
  loss, aux = _loss("sigmoid")
  _close(loss, np.mean(-_log_sigmoid(BETA * h)))
  _close(aux["chosen_rewards"], BETA * (C - RC))
  _close(aux["rejected_rewards"], BETA * (R - RR))
  _close(aux["accuracy"], 0.75)  # pairs 0, 1 and 2 have h > 0
  _close(aux["margin"], BETA * h.mean())
  _close(_loss("hinge")[0], np.mean(np.maximum(0.0, 1.0 - BETA * h)))  # [0.5, 1.25, 0.25, 2]
  _close(_loss("hinge")[0], (0.5 + 0.75 + 0.25 + 2.0) / 4)
  eps = 0.1
  _close(_loss("sigmoid", label_smoothing=eps)[0],  # cDPO, as TRL
         np.mean(-(1 - eps) * _log_sigmoid(BETA * h) - eps * _log_sigmoid(-BETA * h)))
  _close(_loss("robust", label_smoothing=eps)[0],
         np.mean((-(1 - eps) * _log_sigmoid(BETA * h) + eps * _log_sigmoid(-BETA * h)) / (1 - 2 * eps)))
  _close(_loss("robust")[0], _loss("sigmoid")[0])  # ε = 0: plain DPO


def test_ipo_divides_each_log_ratio_by_its_token_count():
  h = (C - RC) / NC - (R - RR) / NR
  _close(h, [0.5 / 2 + 0.5 / 3, 0 / 5 + 0.5 / 2, 0.5 / 1 + 1 / 4, -1 / 4 - 1 / 4])
  loss, aux = _loss("ipo")
  _close(loss, np.mean((h - 1 / (2 * BETA)) ** 2))
  _close(aux["chosen_rewards"], BETA * (C - RC))


def test_simpo_is_reference_free_and_length_normalised():
  gamma = 0.3
  z = BETA * (C / NC - R / NR) - gamma
  loss, aux = _loss("simpo", simpo_gamma=gamma)
  _close(loss, np.mean(-_log_sigmoid(z)))
  _close(aux["chosen_rewards"], BETA * C / NC)
  no_ref, _ = losses.dpo_loss(C.astype(np.float32), R.astype(np.float32), None, None, beta=BETA,
                              loss_type="simpo", simpo_gamma=gamma, chosen_len_B=NC, rejected_len_B=NR)
  _close(no_ref, loss)
  eps = 0.2
  _close(_loss("simpo", simpo_gamma=gamma, label_smoothing=eps)[0],
         np.mean(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)))


def test_dpo_loss_validates():
  with pytest.raises(ValueError, match="loss_type='kto'"):
    _loss("kto")
  with pytest.raises(ValueError, match="give chosen_len_B"):
    losses.dpo_loss(C, R, RC, RR, beta=BETA, loss_type="ipo")
  with pytest.raises(ValueError, match="needs the reference"):
    losses.dpo_loss(C, R, None, None, beta=BETA)


# ------------------------------------------------------------------------------------------- the DPO stage


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return fixtures.pipeline(tmp_path_factory)


def _cfg(pipe, steps=2, **dpo_kw):
  cfg = dpo.config()
  cfg.data.update(train=pipe["comparisons"], eval=pipe["heldout_comparisons"], seq_len=48, batch_size=8,
                  max_responses=2)
  cfg.dpo.update(dpo_kw)
  cfg.train.update(init_from=pipe["sft"], num_steps=steps, log_every=1, eval_every=0, eval_batches=0,
                   checkpoint_every=2)
  cfg.opt.update(warmup_steps=0, lr=1e-3)
  return cfg


def _rows(workdir):
  return metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def test_dpo_main_with_zero_lr_keeps_the_sft_policy(pipe, tmp_path):
  """experiments/dpo.py with opt.lr=0: the policy stays the reference, so every pair's implicit reward is 0 and the
  sigmoid loss is log 2; the checkpoint is a policy (stage "dpo") that stages.load_policy returns."""
  wd = str(tmp_path / "dpo")
  flags = {"data.train": pipe["comparisons"], "data.seq_len": 48, "data.batch_size": 8, "data.max_responses": 2,
           "train.init_from": pipe["sft"], "train.num_steps": 2, "train.log_every": 1, "train.eval_every": 0,
           "opt.lr": 0.0, "opt.warmup_steps": 0}
  out = fixtures.run_main("dpo", wd, flags, pipe["jax_cache"])
  assert out.returncode == 0, out.stderr[-3000:]
  rows = _rows(wd)
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:  # precomputed reference vs the step's forward: float32 rounding only
    assert abs(r["train_loss"] - math.log(2)) < 1e-5 and abs(r["train_margin"]) < 1e-5, r
  _, params, _ = stages.load_policy(wd)
  fixtures.close_trees(params, checkpoint.load_params(pipe["sft"])[0], 0.0)
  assert checkpoint.load_params(wd)[1]["meta"]["stage"] == "dpo"
  assert os.path.exists(os.path.join(wd, dpo.CACHE_FILE))


def test_dpo_raises_implicit_reward_accuracy_on_easy_comparisons(pipe, tmp_path):
  cfg = _cfg(pipe, steps=30)
  cfg.train.checkpoint_every = 30
  last = dpo.run_dpo(cfg, str(tmp_path / "dpo"))
  rows = _rows(str(tmp_path / "dpo"))
  assert abs(rows[0]["train_loss"] - math.log(2)) < 1e-4  # starts at the reference
  final = next(r for r in rows if "eval_accuracy" in r)
  assert final["eval_accuracy"] >= 0.9 and final["eval_loss"] < 0.5, final  # held-out pairs
  assert last["accuracy"] >= 0.9 and last["chosen_rewards"] > last["rejected_rewards"]


def test_on_the_fly_reference_equals_the_precomputed_one(pipe, tmp_path):
  """Two steps at lr 1e-3: the same policy whether π_ref's log-probs come from the cache or the step's forward."""
  a = dpo.run_dpo(_cfg(pipe), str(tmp_path / "pre"))
  b = dpo.run_dpo(_cfg(pipe, ref_logp="on_the_fly"), str(tmp_path / "fly"))
  pa, pb = (checkpoint.load_params(str(tmp_path / d))[0] for d in ("pre", "fly"))
  fixtures.close_trees(pa["policy"], pb["policy"], 1e-5)
  fixtures.close_trees(pb["ref"], checkpoint.load_params(pipe["sft"])[0], 0.0)  # the reference never moves
  assert abs(a["loss"] - b["loss"]) < 1e-5


def test_dpo_resume_is_bit_exact(pipe, tmp_path):
  """4 steps at once == a run stopped by a NaN at step 3 (checkpoint at 2) and rerun: it resumes at step 2, with the
  reference log-probs from the workdir's cache, and ends bit-identical."""
  def cfg(nan_at_step=-1):
    c = _cfg(pipe, steps=4, loss_type="ipo")
    c.data.eval, c.train.nan_at_step = "", nan_at_step
    return c

  dpo.run_dpo(cfg(), str(tmp_path / "a"))
  with pytest.raises(metrics.NonFiniteLossError, match="at step 3"):
    dpo.run_dpo(cfg(nan_at_step=3), str(tmp_path / "b"))
  dpo.run_dpo(cfg(), str(tmp_path / "b"))
  pa, pb = (checkpoint.load_params(str(tmp_path / d))[0] for d in ("a", "b"))
  fixtures.close_trees(pa, pb, 0.0)
  losses_of = lambda d: [(r["step"], r["train_loss"]) for r in _rows(str(tmp_path / d)) if "train_loss" in r]
  assert [s for s, _ in losses_of("b")] == [1, 2, 3, 4] and losses_of("a") == losses_of("b")


def test_dpo_validates_before_writing(pipe, tmp_path):
  wd = str(tmp_path / "dpo")
  cfg = _cfg(pipe)
  cfg.train.init_from = pipe["rm"]
  with pytest.raises(ValueError, match="train.init_from=.* is a 'reward' workdir, not a policy"):
    dpo.run_dpo(cfg, wd)
  for field, value, match in (("loss_type", "kto", "dpo.loss_type='kto'"), ("beta", 0.0, "dpo.beta=0.0"),
                              ("ref_logp", "cached", "dpo.ref_logp='cached'"),
                              ("label_smoothing", 0.5, "dpo.label_smoothing=0.5")):
    cfg = _cfg(pipe, **{field: value})
    with pytest.raises(ValueError, match=match):
      dpo.run_dpo(cfg, wd)
  assert not os.path.exists(wd)
