"""Pure loss functions `(params, batch, rng, ...) -> (loss_sum, aux)` with aux as (sum, count) pairs.

lm: next-token cross-entropy on packed batches, counted where `loss_mask` is 1 (every real target for
pretraining, response targets only for SFT): CE(φ) = −E log y_k.
reward: Bradley–Terry over ranked responses, −log σ(s_w − s_l), all C(K,2) pairs of each record; records are
packed several per batch element (each sequence scored at its last token).
dpo: the DPO family on the same packed comparisons (`dpo_loss` on sequence log-probs; `dpo_pair_loss` batches).
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
  # correct = the target's logit is the largest (a tie for the largest counts): one max over V where argmax's
  # index-tracking reduction costs 14x more on XLA:CPU (65 vs 5 ms at 4096 x 8192)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
  correct = jnp.sum((target_logit_BxL >= jnp.max(logits_BxLxV, -1)) * mask_BxL)
  return loss_sum, {"loss": (loss_sum, count), "accuracy": (correct, count)}


def packed_scores(params, tokens_BxKxL, positions_BxKxL, segment_ids_BxKxL, last_idx_BxM, response_idx_BxKxL=None,
                  *, cfg: TransformerConfig):
  """Reward-model scores of sequences packed into B elements of K rows: ScalarHead on the hidden state at each
  flat slot index row · L + column of `last_idx_BxM` -> score_BxM.

  `params = {"backbone": transformer params, "head": ScalarHead params}`, plus optionally `"loglik"` (a learned
  scalar a), the likelihood feature: score += a · Σ_t log π_backbone(y_t | x, y_<t) over the response tokens
  (and eos), and `"token_head"` (a second ScalarHead u), per-token rewards: score += Σ_t u(h_t) over the slots
  holding y_t. `response_idx_BxKxL` is m + 1 at the slots that predict a response token (or eos) of sequence m,
  else 0.
  """
  return _packed_forward(params, tokens_BxKxL, positions_BxKxL, segment_ids_BxKxL, last_idx_BxM, response_idx_BxKxL,
                         cfg)[0]


def _packed_forward(params, tokens_BxKxL, positions_BxKxL, segment_ids_BxKxL, last_idx_BxM, response_idx_BxKxL, cfg):
  """(scores_BxM, logits_BxKxLxV) of the packed sequences (see `packed_scores`)."""
  B, K, L = tokens_BxKxL.shape
  rows = lambda x: x.reshape(B * K, L)
  logits_NxLxV, h_NxLxD = Transformer(cfg).apply({"params": params["backbone"]}, rows(tokens_BxKxL),
                                                 rows(positions_BxKxL), rows(segment_ids_BxKxL))
  h_BxKLxD = h_NxLxD.reshape(B, K * L, h_NxLxD.shape[-1])
  h_BxMxD = jnp.take_along_axis(h_BxKLxD, last_idx_BxM[..., None].astype(jnp.int32), axis=1)
  score_BxM = ScalarHead(cfg).apply({"params": params["head"]}, h_BxMxD)
  logits_BxKxLxV = logits_NxLxV.reshape(B, K, L, -1)
  if "loglik" not in params and "token_head" not in params:
    return score_BxM, logits_BxKxLxV
  if response_idx_BxKxL is None:
    raise ValueError("this reward model scores response tokens (likelihood feature or token head): give "
                     "response_idx_BxKxL")
  M = last_idx_BxM.shape[1]
  per_sequence = lambda x_BxKxL, idx_BxKxL: _per_sequence(x_BxKxL, idx_BxKxL, M)
  if "loglik" in params:
    logp_BxKxL = rl.token_logprobs(logits_BxKxLxV, jnp.roll(tokens_BxKxL, -1, axis=-1))
    score_BxM = score_BxM + params["loglik"] * per_sequence(logp_BxKxL, response_idx_BxKxL)
  if "token_head" in params:  # on the slots holding the response tokens: one right of those predicting them
    token_BxKxL = ScalarHead(cfg).apply({"params": params["token_head"]}, h_NxLxD).reshape(B, K, L)
    score_BxM = score_BxM + per_sequence(token_BxKxL, jnp.roll(response_idx_BxKxL, 1, axis=-1))
  return score_BxM, logits_BxKxLxV


def _per_sequence(x_BxKxL, idx_BxKxL, M: int):
  """Σ of x over each sequence m's slots (idx = m + 1; 0: none) -> BxM."""
  return jnp.einsum("bkl,bklm->bm", x_BxKxL, jax.nn.one_hot(idx_BxKxL - 1, M, dtype=jnp.float32))


def sequence_logps(params, batch: dict, cfg: TransformerConfig):
  """(Σ_t log π(y_t | x, y_<t) over each packed response's tokens and eos, their count) of a comparison batch
  (data.make_comparison_loader), each BxRxK; `params` are a Transformer's."""
  B, R, K = batch["rank"].shape
  _, Kr, L = batch["tokens"].shape
  rows = lambda x: x.reshape(B * Kr, L)
  logits_NxLxV, _ = Transformer(cfg).apply({"params": params}, rows(batch["tokens"]), rows(batch["positions"]),
                                           rows(batch["segment_ids"]))
  logp_BxKxL = rl.token_logprobs(logits_NxLxV.reshape(B, Kr, L, -1), jnp.roll(batch["tokens"], -1, axis=-1))
  idx_BxKxL = batch["response_idx"]
  logp_BxM = _per_sequence(logp_BxKxL, idx_BxKxL, R * K)
  n_BxM = _per_sequence(jnp.ones_like(logp_BxKxL), idx_BxKxL, R * K)
  return logp_BxM.reshape(B, R, K), n_BxM.reshape(B, R, K)


def sequence_scores(params, tokens_NxL, positions_NxL, segment_ids_NxL, last_idx_N, response_mask_NxL=None, *,
                    cfg: TransformerConfig):
  """Reward-model scores: ScalarHead on the hidden state of each row's last non-pad token -> score_N;
  `response_mask_NxL` (1 at the slots predicting a response token) feeds the likelihood feature if the RM has one."""
  idx = None if response_mask_NxL is None else response_mask_NxL.astype(jnp.int32)[:, None]
  return packed_scores(params, tokens_NxL[:, None], positions_NxL[:, None], segment_ids_NxL[:, None],
                       last_idx_N[:, None], idx, cfg=cfg)[:, 0]


def reward_loss(params, batch: dict, rng: jax.Array, *, cfg: TransformerConfig, lm_coef: float = 0.0):
  """Bradley–Terry over all C(K,2) ranked pairs of each record, the records packed: −log σ(s_w − s_l).

  Batch (from data.make_comparison_loader): tokens/positions/segment_ids BxKxL (K rows per element), and per
  record slot r and response k last_idx/rank/valid BxRxK. Returns the summed pair loss; aux: loss, accuracy,
  margin per pair; score and score² per valid response. With lm_coef > 0 the backbone also keeps its language
  model: + lm_coef × the next-token loss on each record's best-ranked response (`best_mask`), as a mean per token
  rescaled to this device's pair count (so the objective is pair mean + lm_coef × token mean per device).
  """
  del rng
  B, R, K = batch["rank"].shape
  score_BxM, logits_BxKxLxV = _packed_forward(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                                              batch["last_idx"].reshape(B, R * K), batch.get("response_idx"), cfg)
  valid_NxK = batch["valid"].astype(jnp.float32).reshape(B * R, K)
  score_NxK = score_BxM.reshape(B * R, K) * valid_NxK  # NaN-poisoned masks reach the loss
  loss, aux = rl.pairwise_bradley_terry(score_NxK, batch["rank"].reshape(B * R, K), valid_NxK)
  pairs = aux["num_pairs"].astype(jnp.float32)
  n = jnp.sum(valid_NxK)
  out = {"loss": (loss * pairs, pairs), "accuracy": (aux["accuracy"] * pairs, pairs),
         "margin": (aux["margin"] * pairs, pairs), "score": (jnp.sum(score_NxK), n),
         "score_sq": (jnp.sum(score_NxK ** 2), n)}
  total = loss * pairs
  if lm_coef > 0:
    targets_BxKxL = jnp.roll(batch["tokens"], -1, axis=-1)  # best_mask is 0 on each row's last slot
    nll_BxKxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxKxLxV, targets_BxKxL)
    mask_BxKxL = batch["best_mask"].astype(jnp.float32)
    lm_sum, lm_n = jnp.sum(nll_BxKxL * mask_BxKxL), jnp.sum(mask_BxKxL)
    total = total + lm_coef * lm_sum * pairs / jnp.maximum(lm_n, 1.0)
    out["lm_loss"] = (lm_sum, lm_n)
  return total, out


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo")


def _dpo_terms(chosen_logp_B, rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B, *, beta, loss_type,
               label_smoothing, simpo_gamma, chosen_len_B, rejected_len_B):
  """(per-pair loss_B, chosen_rewards_B, rejected_rewards_B) of `dpo_loss` (see there)."""
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"losses.dpo_loss: loss_type={loss_type!r}; expected one of {DPO_LOSS_TYPES}")
  if loss_type in ("ipo", "simpo") and (chosen_len_B is None or rejected_len_B is None):
    raise ValueError(f"losses.dpo_loss: loss_type={loss_type!r} divides by response lengths: give chosen_len_B "
                     f"and rejected_len_B")
  if loss_type != "simpo" and (ref_chosen_logp_B is None or ref_rejected_logp_B is None):
    raise ValueError(f"losses.dpo_loss: loss_type={loss_type!r} needs the reference log-probs")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  c, r, eps = f32(chosen_logp_B), f32(rejected_logp_B), label_smoothing
  smoothed = lambda z: -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
  if loss_type == "simpo":  # reference-free: length-normalised log-probs, target margin γ
    n_c, n_r = jnp.maximum(f32(chosen_len_B), 1.0), jnp.maximum(f32(rejected_len_B), 1.0)
    chosen, rejected = beta * c / n_c, beta * r / n_r
    return smoothed(chosen - rejected - simpo_gamma), chosen, rejected
  ref_c, ref_r = f32(ref_chosen_logp_B), f32(ref_rejected_logp_B)
  chosen, rejected = beta * (c - ref_c), beta * (r - ref_r)
  delta_B = (c - ref_c) - (r - ref_r)
  if loss_type == "sigmoid":
    loss_B = smoothed(beta * delta_B)
  elif loss_type == "hinge":
    loss_B = jax.nn.relu(1.0 - beta * delta_B)
  elif loss_type == "ipo":  # per-token log-ratios (IPO's and TRL's convention)
    n_c, n_r = jnp.maximum(f32(chosen_len_B), 1.0), jnp.maximum(f32(rejected_len_B), 1.0)
    loss_B = jnp.square((c - ref_c) / n_c - (r - ref_r) / n_r - 1.0 / (2.0 * beta))
  else:  # robust
    loss_B = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * delta_B)
              + eps * jax.nn.log_sigmoid(-beta * delta_B)) / (1.0 - 2.0 * eps)
  return loss_B, chosen, rejected


def dpo_loss(chosen_logp_B, rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B, *, beta, loss_type="sigmoid",
             label_smoothing=0.0, simpo_gamma=0.5, chosen_len_B=None, rejected_len_B=None):
  """DPO family on sequence log-probs (sums over response tokens) of chosen (c) and rejected (r) responses;
  h = log π(c) − log π_ref(c) − (log π(r) − log π_ref(r)), ε = label_smoothing, |y| a response's token count:

  "sigmoid" (DPO; cDPO with ε > 0, as TRL): −(1−ε) log σ(βh) − ε log σ(−βh);
  "hinge" (SLiC): max(0, 1 − βh);
  "ipo": (h' − 1/(2β))², h' the same difference of log-ratios each divided by its response's |y|;
  "robust" (rDPO): (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε);
  "simpo" (reference-free; refs may be None): −(1−ε) log σ(z) − ε log σ(−z), z = β(log π(c)/|c| − log π(r)/|r|) − γ.
  Returns (mean loss over pairs, aux): "chosen_rewards" / "rejected_rewards" per pair, β(log π − log π_ref)
  (simpo: β log π/|y|), "accuracy" (fraction of pairs with chosen reward > rejected), "margin" (mean difference).
  """
  loss_B, chosen_B, rejected_B = _dpo_terms(
      chosen_logp_B, rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B, beta=beta, loss_type=loss_type,
      label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, chosen_len_B=chosen_len_B,
      rejected_len_B=rejected_len_B)
  aux = {"chosen_rewards": chosen_B, "rejected_rewards": rejected_B,
         "accuracy": jnp.mean((chosen_B > rejected_B).astype(jnp.float32)), "margin": jnp.mean(chosen_B - rejected_B)}
  return jnp.mean(loss_B), aux


def dpo_pair_loss(params, batch: dict, rng: jax.Array, *, cfg: TransformerConfig, beta: float,
                  loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = 0.5):
  """The DPO family (`dpo_loss`) over all C(K,2) ranked pairs (rank_i < rank_j, both valid) of each packed record.

  `params = {"policy"}` with the batch's reference log-probs `ref_logp` (BxRxK, precomputed), or
  `{"policy", "ref"}`: the frozen reference's computed here (under stop_gradient). Returns the pair-summed loss;
  aux per pair: loss, accuracy (chosen implicit reward > rejected), margin, chosen_rewards, rejected_rewards.
  """
  del rng
  logp_BxRxK, n_BxRxK = sequence_logps(params["policy"], batch, cfg)
  if "ref" in params:
    ref_BxRxK = jax.lax.stop_gradient(sequence_logps(params["ref"], batch, cfg)[0])
  else:
    ref_BxRxK = batch["ref_logp"]
  B, R, K = batch["rank"].shape
  flat = lambda x: x.reshape(B * R, K)
  rank_NxK, valid_NxK = flat(batch["rank"]), flat(batch["valid"]) != 0
  pair_NxKxK = (rank_NxK[:, :, None] < rank_NxK[:, None, :]) & valid_NxK[:, :, None] & valid_NxK[:, None, :]
  chosen = lambda x: jnp.broadcast_to(flat(x)[:, :, None], pair_NxKxK.shape).reshape(-1)
  rejected = lambda x: jnp.broadcast_to(flat(x)[:, None, :], pair_NxKxK.shape).reshape(-1)
  loss_P, chosen_P, rejected_P = _dpo_terms(
      chosen(logp_BxRxK), rejected(logp_BxRxK), chosen(ref_BxRxK), rejected(ref_BxRxK), beta=beta,
      loss_type=loss_type, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
      chosen_len_B=chosen(n_BxRxK), rejected_len_B=rejected(n_BxRxK))
  pair_P = pair_NxKxK.reshape(-1)
  total = lambda x: jnp.sum(jnp.where(pair_P, x, 0.0))
  pairs = jnp.sum(pair_P).astype(jnp.float32)
  loss_sum = total(loss_P)
  return loss_sum, {"loss": (loss_sum, pairs), "accuracy": (total((chosen_P > rejected_P).astype(jnp.float32)), pairs),
                    "margin": (total(chosen_P - rejected_P), pairs), "chosen_rewards": (total(chosen_P), pairs),
                    "rejected_rewards": (total(rejected_P), pairs)}


bradley_terry_loss = rl.bradley_terry_loss
ppo_policy_loss = rl.ppo_policy_loss
ppo_value_loss = rl.ppo_value_loss
group_advantages = rl.group_advantages
grpo_policy_loss = rl.grpo_policy_loss
