"""DPO family: every loss type by hand (NumPy), and the DPO stage on the shared trainer (lr = 0 keeps SFT, accuracy
rises on easy comparisons, resume is bit-exact, init_from must be a policy workdir, 4 devices == 1 device)."""
import numpy as np
import pytest

from rlhf_jax import losses

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
