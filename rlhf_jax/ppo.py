"""PPO-ptx: rollout -> RM scores -> per-token KL-shaped rewards -> GAE -> one compiled PPO update.

Objective (InstructGPT): maximise E_{x~D_RL, y~π}[RM(x,y) − β·log(π(y|x)/π_SFT(y|x))] + γ·E_{x~D_pretrain}[log π(x)].
Per token t of a response: r_t = −β·kl_t (+ RM score on the last token), kl_t from `rl.kl_estimate` with the
configured estimator (k1 = log π − log π_SFT by default). GAE(γ_rl, λ) on the value network's V_t; advantages
optionally whitened over the whole rollout batch. The update scans epochs × minibatches in one jit:
L = L_clip(ρ, A, ε) + c_vf·L_V(ε_vf) − γ·(1/N_ptx)·Σ log π(x_ptx). Score and update are written for the global
batch and compiled over the device mesh (parallel.jit): all four networks sharded by their logical axes.
With `ppo.group_size` G > 1 every prompt is sampled G times and the advantage is RLOO's instead of GAE's: the RM
score minus the mean of the other G − 1 scores of its prompt (a Bradley–Terry RM's per-prompt level is arbitrary),
then the reward-to-go of the KL-shaped rewards: no critic, so no value network is built, scored or trained (the
update costs one network's forward/backward instead of two). `run(reward_fn=...)` replaces the RM by a function.

Networks (InstructGPT's four): policy and value trained (`Trainable`), reference and reward model frozen
(`Frozen`). The value network is a Transformer + ScalarHead, initialised from the RM or from SFT + a new head.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct

from rlhf_jax import checkpoint, data, losses, metrics, optimizer, parallel, rl, sampling, trainer
from rlhf_jax import model as model_lib
from rlhf_jax.model import ScalarHead, Transformer, TransformerConfig


@struct.dataclass
class Trainable:
  """The trained parameter groups: policy (Transformer) and value ({"backbone", "head"}; None for RLOO)."""
  policy: Any
  value: Any


@struct.dataclass
class Frozen:
  """The frozen parameter groups: reference policy (SFT) and reward model ({"backbone", "head"})."""
  ref: Any
  reward: Any


@struct.dataclass
class PPOState:
  """Everything the update changes: iteration counter, trainable params, optimizer state, base RNG."""
  step: jax.Array
  params: Trainable
  opt_state: Any
  rng: jax.Array


@struct.dataclass
class Rollout:
  """One scored rollout batch: sequences for the forward passes and per-response-token PPO targets."""
  sequence_BxS: jax.Array  # prompt (left-padded, P slots) + response (T slots)
  segment_ids_BxS: jax.Array  # 1 on real tokens, 0 on padding
  positions_BxS: jax.Array
  mask_BxT: jax.Array  # response tokens (float32)
  old_logp_BxT: jax.Array
  old_values_BxT: jax.Array
  advantages_BxT: jax.Array
  returns_BxT: jax.Array


@struct.dataclass(frozen=True)
class Models:
  """Static architecture of each network (hashable: part of the compiled functions' identity)."""
  policy: TransformerConfig = struct.field(pytree_node=False)
  value: TransformerConfig = struct.field(pytree_node=False)
  reward: TransformerConfig = struct.field(pytree_node=False)


def response_logits(params, cfg: TransformerConfig, seq_BxS, seg_BxS, pos_BxS, T: int):
  """(logits_BxTxV predicting the T response tokens, h_BxTxD of the slots that predict them)."""
  S = seq_BxS.shape[1]  # the head runs on the T predicting slots only (not on the prompt's)
  logits_BxTxV, h_BxSxD = Transformer(cfg).apply({"params": params}, seq_BxS, pos_BxS, seg_BxS,
                                                 logits_slots=(S - T - 1, S - 1))
  return logits_BxTxV, h_BxSxD[:, -T - 1:-1]


def values_of(value_params, cfg: TransformerConfig, seq_BxS, seg_BxS, pos_BxS, T: int):
  """V_t for each response slot t: the value head on the hidden state that predicts token t."""
  _, h_BxTxD = response_logits(value_params["backbone"], cfg, seq_BxS, seg_BxS, pos_BxS, T)
  return ScalarHead(cfg).apply({"params": value_params["head"]}, h_BxTxD)


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


def score_rollout(params: Trainable, frozen: Frozen, samples: sampling.Samples, kl_coef, score_offset, score_B=None, *,
                  models: Models, ppo) -> tuple[Rollout, dict]:
  """Reference log-probs, values, RM scores, shaped rewards, GAE, (whitened) advantages of the global batch.

  `samples` must come from `params.policy`: its old log-probs and entropy are the sampler's (`logprobs_BxT`,
  `entropy_BxT`, computed while decoding; equal to a full forward's to float32 rounding), so scoring runs three
  forwards (reference, value, reward), not four. A given `score_B` (per response) replaces the RM's score.
  """
  T = samples.tokens_BxT.shape[1]
  seq, seg, pos = samples.sequence_BxPT, samples.sequence_mask_BxPT, samples.positions_BxPT
  mask_BxT = samples.mask_BxT.astype(jnp.float32)
  tokens_BxT = seq[:, -T:]
  logp_BxT = samples.logprobs_BxT.astype(jnp.float32) * mask_BxT
  ref_logits_BxTxV, _ = response_logits(frozen.ref, models.policy, seq, seg, pos, T)
  ref_logp_BxT = rl.token_logprobs(ref_logits_BxTxV, tokens_BxT) * mask_BxT
  values_BxT = (values_of(params.value, models.value, seq, seg, pos, T) * mask_BxT if params.value is not None
                else jnp.zeros_like(mask_BxT))  # RLOO: no critic
  last_B = seq.shape[1] - T - 1 + samples.lengths_B
  if score_B is None:  # the RM's score; a given score_B (from `run`'s reward_fn) replaces it
    B, P = seq.shape[0], seq.shape[1] - T  # slots P - 1 .. P + T - 2 predict the response tokens
    predicting_BxS = jnp.concatenate([jnp.zeros((B, P - 1)), mask_BxT, jnp.zeros((B, 1))], axis=1)
    score_B = losses.sequence_scores(frozen.reward, seq, pos, seg, last_B, predicting_BxS,
                                     cfg=models.reward) - score_offset
  kl_BxT = rl.kl_estimate(logp_BxT, ref_logp_BxT, ppo.kl_estimator) * mask_BxT
  reward_B = group_baselined(score_B, ppo.group_size) if ppo.group_size > 1 else score_B
  rewards_BxT = rl.shaped_rewards(reward_B, kl_BxT, mask_BxT, kl_coef)
  if ppo.group_size > 1:  # RLOO: the group is the baseline, no critic; advantage = reward-to-go
    adv_BxT, ret_BxT = rl.gae(jnp.zeros_like(values_BxT), rewards_BxT, mask_BxT, ppo.gamma, 1.0)
  else:
    adv_BxT, ret_BxT = rl.gae(values_BxT, rewards_BxT, mask_BxT, ppo.gamma, ppo.lam)
  if ppo.whiten_advantages:
    adv_BxT = global_whiten(adv_BxT, mask_BxT)
  rollout = Rollout(seq, seg, pos, mask_BxT, logp_BxT, values_BxT, adv_BxT, ret_BxT)
  B, n = jnp.float32(score_B.shape[0]), jnp.sum(mask_BxT)
  res_BxT = (ret_BxT - values_BxT) * mask_BxT
  sums = {"score": (jnp.sum(score_B), B), "score_sq": (jnp.sum(score_B ** 2), B),
          "kl": (jnp.sum(kl_BxT), B), "kl_k1": (jnp.sum(logp_BxT - ref_logp_BxT), B),
          "entropy": (jnp.sum(samples.entropy_BxT * mask_BxT), n),
          "response_length": (jnp.sum(samples.lengths_B), B),
          "ended_with_eos": (jnp.sum(samples.ended_with_eos_B), B),
          "ret": (jnp.sum(ret_BxT), n), "ret_sq": (jnp.sum(ret_BxT ** 2), n),
          "res": (jnp.sum(res_BxT), n), "res_sq": (jnp.sum(res_BxT ** 2), n)}
  return rollout, sums


def ppo_loss(params: Trainable, mb: dict, rng, *, models: Models, ppo):
  """Summed minibatch loss (policy + c_vf·value over response tokens, + γ·ptx rescaled to the same count)."""
  r: Rollout = mb["rollout"]
  T = r.mask_BxT.shape[1]
  logits_BxTxV, _ = response_logits(params.policy, models.policy, r.sequence_BxS, r.segment_ids_BxS,
                                    r.positions_BxS, T)
  logp_BxT = rl.token_logprobs(logits_BxTxV, r.sequence_BxS[:, -T:])
  pg, pg_aux = rl.ppo_policy_loss(logp_BxT, r.old_logp_BxT, r.advantages_BxT, r.mask_BxT, ppo.clip_eps)
  vf, vf_aux = jnp.float32(0.0), {"vf_clipfrac": jnp.float32(0.0)}  # RLOO (params.value None): no critic
  if params.value is not None:
    values_BxT = values_of(params.value, models.value, r.sequence_BxS, r.segment_ids_BxS, r.positions_BxS, T)
    vf, vf_aux = rl.ppo_value_loss(values_BxT, r.old_values_BxT, r.returns_BxT, r.mask_BxT, ppo.vf_clip)
  n = jnp.sum(r.mask_BxT)
  loss_sum = (pg + ppo.vf_coef * vf) * n
  aux = {"policy_loss": (pg * n, n), "value_loss": (vf * n, n), "clipfrac": (pg_aux["clipfrac"] * n, n),
         "approx_kl": (pg_aux["approx_kl"] * n, n), "vf_clipfrac": (vf_aux["vf_clipfrac"] * n, n)}
  if ppo.ptx_coef > 0:
    ptx_sum, ptx_aux = losses.lm_loss(params.policy, mb["ptx"], rng, cfg=models.policy)
    loss_sum = loss_sum + ppo.ptx_coef * ptx_sum * mb["ptx_scale"]
    aux["ptx_loss"] = ptx_aux["loss"]
  aux["loss"] = (loss_sum, n)
  return loss_sum, aux


def _minibatches(tree, perm_b, M: int):
  """Permutes the leading axis and splits it into M equal minibatches: (b, ...) -> (M, b/M, ...)."""
  return jax.tree.map(lambda x: x[perm_b].reshape((M, x.shape[0] // M) + x.shape[1:]), tree)


def ppo_update(state: PPOState, rollout: Rollout, ptx: dict | None, *, tx: optax.GradientTransformation,
               models: Models, ppo) -> tuple[PPOState, dict]:
  """`ppo_epochs` × `minibatches` clipped PPO(-ptx) steps on the global batch in one nested lax.scan; metrics
  (sum, count). The key is fold_in(fold_in(rng, step), 0): device 0's under the former per-device pmap (one-device
  runs permute as before), and each epoch permutes the global batch, so results do not depend on the mesh."""
  M, b = ppo.minibatches, rollout.mask_BxT.shape[0]
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)
  n_global = jnp.sum(rollout.mask_BxT)
  ptx_mbs = None
  if ptx is not None:  # one pretraining batch per iteration, split over the minibatches, reused each epoch
    ptx_mbs = _minibatches(ptx, jnp.arange(ptx["inputs"].shape[0]), M)
    ptx_scale = n_global / jnp.maximum(jnp.sum(ptx["loss_mask"]), 1.0)
  loss_fn = functools.partial(ppo_loss, models=models, ppo=ppo)

  def minibatch(carry, xs):
    params, opt_state = carry
    mb_rollout, mb_ptx, key = xs
    mb = {"rollout": mb_rollout}
    if mb_ptx is not None:
      mb.update(ptx=mb_ptx, ptx_scale=ptx_scale)
    aux, grads = trainer.mean_grads(loss_fn, params, mb, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    aux["grad_norm"] = (optax.tree.norm(grads), jnp.float32(1.0))
    return (optax.apply_updates(params, updates), opt_state), aux

  def epoch(carry, e):
    key = jax.random.fold_in(rng, e)
    mbs = _minibatches(rollout, jax.random.permutation(key, b), M)
    keys = jax.random.split(jax.random.fold_in(key, 1), M)
    return jax.lax.scan(minibatch, carry, (mbs, ptx_mbs, keys))

  (params, opt_state), aux = jax.lax.scan(epoch, (state.params, state.opt_state), jnp.arange(ppo.ppo_epochs))
  sums = jax.tree.map(jnp.sum, aux)  # over epochs × minibatches
  return PPOState(state.step + 1, params, opt_state, state.rng), sums


# ------------------------------------------------------------------------------------------ host side


@dataclasses.dataclass(frozen=True)
class Hyper:
  """PPO hyper-parameters the compiled functions close over (hashable; from `cfg.ppo`)."""
  kl_estimator: str
  gamma: float
  lam: float
  clip_eps: float
  vf_clip: float
  vf_coef: float
  ptx_coef: float
  whiten_advantages: bool
  ppo_epochs: int
  minibatches: int
  group_size: int = 1

  @classmethod
  def from_config(cls, ppo) -> "Hyper":
    if ppo.kl_estimator not in rl.KL_ESTIMATORS:
      raise ValueError(f"config ppo.kl_estimator={ppo.kl_estimator!r}; expected one of {rl.KL_ESTIMATORS}")
    for field in ("ppo_epochs", "minibatches", "group_size"):
      if ppo[field] < 1:
        raise ValueError(f"config ppo.{field}={ppo[field]} must be >= 1")
    return cls(**{f.name: ppo[f.name] for f in dataclasses.fields(cls)})


def ppo_config() -> ml_collections.ConfigDict:
  """The `cfg.ppo` group: the ablation knobs of InstructGPT's PPO-ptx."""
  p = ml_collections.ConfigDict()
  p.reward_from = ""  # reward-model workdir (frozen RM; its reward_offset.json is subtracted)
  p.value_init = "reward"  # value network from the RM ("reward") or SFT backbone + fresh head ("sft"); RLOO has none
  p.kl_coef = 0.05  # β, per-token KL penalty to the SFT policy (initial value when adaptive)
  p.adaptive_kl = False  # Ziegler et al. adaptive β towards kl_target
  p.kl_target = 3.0  # target KL per response (nats, summed over tokens) for adaptive β
  p.kl_horizon = 10000  # adaptive β horizon (in rollout samples)
  p.kl_estimator = "k1"  # per-token KL estimator in the reward: k1 | k2 | k3
  p.ptx_coef = 1.0  # γ, pretraining-mix coefficient (0 = plain PPO)
  p.clip_eps = 0.2  # policy ratio clip ε
  p.vf_clip = 0.2  # value clip around the old values
  p.vf_coef = 0.5  # value-loss weight
  p.gamma = 1.0  # discount
  p.lam = 0.95  # GAE λ
  p.whiten_advantages = True  # normalise advantages over the rollout batch
  p.ppo_epochs = 2  # passes over each rollout batch
  p.minibatches = 2  # minibatches per epoch (rows per batch shard must divide)
  p.rollout_batch = 32  # responses per iteration (global; divisible by mesh.data × mesh.fsdp × minibatches)
  p.group_size = 1  # responses per prompt; > 1: RLOO (score minus its group's leave-one-out mean; no value network)
  p.temperature = 1.0  # rollout sampling temperature
  p.top_k = 0  # rollout top-k (0 = off)
  p.top_p = 1.0  # rollout nucleus (1 = off)
  p.max_new_tokens = 16  # response length cap
  p.sample_every = 10  # iterations between logged sample completions (0 = never)
  return p


def config() -> ml_collections.ConfigDict:
  """The whole config of the PPO experiment: data (prompts, ptx), ppo knobs, optimizer, iterations."""
  cfg = ml_collections.ConfigDict()
  cfg.data = ml_collections.ConfigDict()
  cfg.data.prompts = ""  # RL prompts JSONL {"prompt"} (or tfds:NAME)
  cfg.data.ptx = ""  # pretraining text for the ptx term (required when ppo.ptx_coef > 0)
  cfg.data.prompt_len = 32  # P: prompts are left-padded to this many tokens (incl. bos)
  cfg.data.truncate = False  # cut prompts longer than prompt_len from the left instead of raising
  cfg.data.ptx_seq_len = 64  # packed pretraining rows for the ptx term
  cfg.data.ptx_batch_size = 16  # ptx rows per iteration (split over the minibatches)
  cfg.data.seed = 0  # prompt order
  cfg.ppo = ppo_config()
  cfg.opt = optimizer.default_config(lr=2e-5)
  cfg.opt.warmup_steps = 0
  cfg.opt.schedule = "constant"
  cfg.opt.weight_decay = 0.0
  cfg.train = trainer.train_config(num_steps=100)  # num_steps = PPO iterations (rollout + update)
  cfg.train.log_every = 1
  cfg.train.checkpoint_every = 25
  cfg.mesh = parallel.mesh_config()
  return cfg


def rollout_key(seed: int, it: int) -> jax.Array:
  """Iteration `it`'s sampling key for the whole rollout batch: split(fold_in(PRNGKey(seed + 1), it), 1)[0], the
  key device 0 drew under the former per-device pmap (one-device runs sample as before), on any mesh."""
  return jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed + 1), it), 1)[0]


def compile_steps(mesh, state_sh, tx: optax.GradientTransformation, models: Models, hyper) -> tuple[Callable,
                                                                                                   Callable]:
  """(score, update) compiled over `mesh`: rollouts over the batch shards, the state laid out as `state_sh`
  (donated to the update), metrics replicated; the other inputs keep the layout they come with."""
  batch, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  p_score = parallel.jit(functools.partial(score_rollout, models=models, ppo=hyper), None, (batch, rep))
  p_update = parallel.jit(functools.partial(ppo_update, tx=tx, models=models, ppo=hyper), None, (state_sh, rep),
                          donate_argnums=(0,))
  return p_score, p_update


def _controller(ppo):
  if ppo.adaptive_kl:
    return rl.AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
  return rl.FixedKLController(ppo.kl_coef)


def _host_metrics(sums: dict) -> dict:
  """Summarized (sum, count) metrics plus score std and explained variance derived from moments."""
  m = metrics.summarize(sums)
  m["score_std"] = float(np.sqrt(max(m.pop("score_sq") - m["score"] ** 2, 0.0)))
  var_ret = m.pop("ret_sq") - m.pop("ret") ** 2
  var_res = m.pop("res_sq") - m.pop("res") ** 2
  m["explained_variance"] = float(1.0 - var_res / var_ret) if var_ret > 1e-12 else 0.0
  return m


def run(cfg: ml_collections.ConfigDict, workdir: str, extra_metrics: Callable[[list, list], dict] | None = None,
        reward_fn: Callable[[list, list], np.ndarray] | None = None) -> dict:
  """PPO-ptx from an SFT workdir (`train.init_from`) against a reward model (`ppo.reward_from`); auto-resumes.

  `extra_metrics(prompts, responses)`, if given, adds metrics computed on each iteration's decoded rollouts
  (the pipeline logs the task oracle's score this way). `reward_fn(prompts, responses) -> scores`, if given,
  replaces the RM's score (a programmatic reward, e.g. the task oracle as the ceiling any RM could give); the
  RM of `ppo.reward_from` is then only used to initialise the value network, and may be left out with
  `ppo.value_init="sft"`.
  """
  from rlhf_jax import stages  # stage plumbing (loading SFT/RM workdirs, data files)
  # ---- inputs, validated before anything is written
  hyper = Hyper.from_config(cfg.ppo)
  mesh = parallel.make_mesh(cfg.mesh)
  if cfg.ppo.value_init not in ("reward", "sft"):
    raise ValueError(f"config ppo.value_init={cfg.ppo.value_init!r}; expected 'reward' or 'sft'")
  if not cfg.train.init_from:
    raise ValueError("config train.init_from is empty: give the SFT workdir (policy and reference)")
  critic = hyper.group_size == 1  # RLOO (group_size > 1) has no value network
  if not cfg.ppo.reward_from and (reward_fn is None or (critic and cfg.ppo.value_init == "reward")):
    raise ValueError("config ppo.reward_from is empty: give the reward-model workdir" +
                     (" (with a reward function it only initialises the value network: or set ppo.value_init="
                      "'sft')" if reward_fn is not None else ""))
  prompt_files = stages.checked_files(cfg.data.prompts, "data.prompts")
  ptx_files = stages.checked_files(cfg.data.ptx, "data.ptx") if hyper.ptx_coef > 0 else None
  policy_cfg, sft_params, tok = stages.load_policy(cfg.train.init_from)
  rm_cfg, rm_params, offset = (stages.load_reward_model(cfg.ppo.reward_from) if cfg.ppo.reward_from
                                else (policy_cfg, None, 0.0))
  parallel.check_model(policy_cfg, mesh, f"the policy of train.init_from={cfg.train.init_from!r}: model")
  parallel.check_model(rm_cfg, mesh, f"the reward model of ppo.reward_from={cfg.ppo.reward_from!r}: model")
  if rm_cfg.vocab_size != policy_cfg.vocab_size:
    raise ValueError(f"reward model {cfg.ppo.reward_from!r} vocab_size={rm_cfg.vocab_size} differs from the "
                     f"policy's ({policy_cfg.vocab_size}): they must share the tokenizer")
  total = cfg.data.prompt_len + cfg.ppo.max_new_tokens
  for name, m in (("policy", policy_cfg), ("reward model", rm_cfg)):
    if total > m.max_len:
      raise ValueError(f"config data.prompt_len={cfg.data.prompt_len} + ppo.max_new_tokens="
                       f"{cfg.ppo.max_new_tokens} = {total} exceeds the {name}'s max_len={m.max_len}")
  rows = parallel.check_divisible(cfg.ppo.rollout_batch, "config ppo.rollout_batch", mesh)
  if rows % hyper.minibatches:
    raise ValueError(f"config ppo.rollout_batch={cfg.ppo.rollout_batch} gives {rows} rows per batch shard, not "
                     f"divisible by ppo.minibatches={hyper.minibatches}")
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if rows % hyper.group_size:
    raise ValueError(f"config ppo.rollout_batch={cfg.ppo.rollout_batch} gives {rows} rows per batch shard, not "
                     f"divisible by ppo.group_size={hyper.group_size} (a prompt's responses share a shard)")
  prompt_loader = data.make_prompt_loader(prompt_files, tok, cfg.data.prompt_len,
                                          cfg.ppo.rollout_batch // hyper.group_size,
                                          cfg.data.seed, workdir, truncate_prompt=cfg.data.truncate,
                                          batch_field="ppo.rollout_batch / ppo.group_size",
                                          local_device_count=1, **hosts)  # prompts are repeated G times, then split
  ptx_loader = None
  if ptx_files:
    ptx_loader = data.make_lm_loader(ptx_files, tok, cfg.data.ptx_seq_len, cfg.data.ptx_batch_size, cfg.data.seed,
                                     workdir, batch_field="data.ptx_batch_size",
                                     local_device_count=parallel.local_batch_shards(mesh), **hosts)
    if parallel.check_divisible(cfg.data.ptx_batch_size, "config data.ptx_batch_size", mesh) % hyper.minibatches:
      raise ValueError(f"config data.ptx_batch_size={cfg.data.ptx_batch_size}: rows per batch shard must be "
                       f"divisible by ppo.minibatches={hyper.minibatches}")

  # ---- networks and state: resume > SFT/RM init
  if not critic:
    value_cfg, value_params = policy_cfg, None
  elif cfg.ppo.value_init == "reward":
    value_cfg, value_params = rm_cfg, rm_params
  else:
    value_cfg = policy_cfg
    value_params = stages.fresh_reward_params(policy_cfg, jax.random.PRNGKey(cfg.train.seed), backbone=sft_params)
  models = Models(policy_cfg, value_cfg, rm_cfg)
  num_updates = cfg.train.num_steps * hyper.ppo_epochs * hyper.minibatches
  tx = optimizer.make_optimizer(cfg.opt, num_updates)

  def fresh() -> PPOState:
    params = Trainable(policy=sft_params, value=value_params)
    return PPOState(jnp.int32(0), params, tx.init(params), jax.random.PRNGKey(cfg.train.seed))

  ctl = _controller(cfg.ppo)
  stages.install_tokenizer(tok, workdir)
  abstract = jax.eval_shape(fresh)
  policy_axes = model_lib.logical_axes(lambda: model_lib.boxed_params(policy_cfg, jax.random.PRNGKey(0)))
  value_axes = (None if not critic else stages.reward_axes(value_cfg, value_params))
  state_sh = parallel.state_shardings(mesh, abstract, Trainable(policy=policy_axes, value=value_axes))
  frozen_axes = Frozen(ref=policy_axes, reward=stages.reward_axes(rm_cfg, rm_params) if rm_params else None)
  frozen = Frozen(ref=sft_params, reward=rm_params)
  frozen = parallel.shard_tree(frozen, parallel.state_shardings(mesh, frozen, frozen_axes))
  ckpt = checkpoint.Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    state, extra = ckpt.restore(start, parallel.with_shardings(abstract, state_sh))
    prompt_loader.set_state(extra["data"]["prompts"])
    if ptx_loader is not None:
      ptx_loader.set_state(extra["data"]["ptx"])
    ctl.load_state_dict(extra["data"]["kl"])
    logging.info("ppo: resumed at iteration %d (kl_coef %.4f)", start, ctl.value)
  else:
    params = parallel.shard_tree(Trainable(policy=sft_params, value=value_params), state_sh.params)
    opt_state = parallel.jit(tx.init, (state_sh.params,), state_sh.opt_state)(params)
    state = PPOState(parallel.shard_tree(np.int32(0), state_sh.step), params, opt_state,
                     parallel.shard_tree(jax.random.PRNGKey(cfg.train.seed), state_sh.rng))
  meta = {"stage": "ppo", "model": dataclasses.asdict(policy_cfg), "sft": cfg.train.init_from,
          "reward": cfg.ppo.reward_from if reward_fn is None else f"reward_fn {getattr(reward_fn, '__name__', '')}"}

  # ---- compiled functions (over the mesh)
  logging.info("ppo: %s", parallel.describe_mesh(mesh))
  sampler = sampling.make_sampler(mesh, policy_cfg, max_new_tokens=cfg.ppo.max_new_tokens,
                                  temperature=cfg.ppo.temperature, top_k=cfg.ppo.top_k, top_p=cfg.ppo.top_p,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id)
  p_score, p_update = compile_steps(mesh, state_sh, tx, models, hyper)
  del sft_params, rm_params, value_params  # the host copies (the sharded ones live in state and frozen)
  writer = metrics.MetricWriter(workdir, resume_step=start)
  progress = metrics.Progress(cfg.train.num_steps, start)
  last: dict = {}

  # ---- iterations: rollout -> score -> update -> log -> checkpoint
  try:
    for it in range(start + 1, cfg.train.num_steps + 1):
      batch = next(prompt_loader)
      prompts = [p for p in batch.pop("prompts") for _ in range(hyper.group_size)]
      batch = {k: np.repeat(v, hyper.group_size, axis=0) for k, v in batch.items()}
      t0 = time.perf_counter()
      rng = rollout_key(cfg.train.seed, it)
      sharded = parallel.put_batch(mesh, batch, "config ppo.rollout_batch")
      samples = sampler(state.params.policy, sharded["prompt_tokens"], sharded["prompt_mask"], rng)
      jax.block_until_ready(samples.tokens_BxT)
      t1 = time.perf_counter()
      texts = None
      if extra_metrics or reward_fn or (cfg.ppo.sample_every and it % cfg.ppo.sample_every == 0):
        local = parallel.local_rows((samples.tokens_BxT, samples.lengths_B))  # this host's prompts' rows
        texts = [tok.decode(t[:n]) for t, n in zip(*local)]
      given = None
      if reward_fn is not None:
        given = parallel.put_batch(mesh, np.asarray(reward_fn(prompts, texts), np.float32).reshape(len(texts)),
                                   "config ppo.rollout_batch")
      rollout, score_sums = p_score(state.params, frozen, samples, np.float32(ctl.value), np.float32(offset), given)
      ptx = parallel.put_batch(mesh, next(ptx_loader), "config data.ptx_batch_size") if ptx_loader else None
      if it == cfg.train.nan_at_step:
        rollout = rollout.replace(advantages_BxT=rollout.advantages_BxT * np.nan)
      state, update_sums = p_update(state, rollout, ptx)
      m = _host_metrics({**parallel.to_host(score_sums), **parallel.to_host(update_sums)})
      t2 = time.perf_counter()
      metrics.check_finite(m, it, "ppo")
      m.update(kl_coef=ctl.value, generation_s=t1 - t0, update_s=t2 - t1)
      ctl.update(m["kl"], cfg.ppo.rollout_batch)
      line = progress.update(it, float(np.sum(batch["prompt_mask"]) + m["response_length"] * len(prompts)))
      if it % cfg.train.log_every == 0 or it == cfg.train.num_steps:
        logging.info("ppo %s  score %.3f  kl %.3f  clipfrac %.3f", line, m["score"], m["kl"], m["clipfrac"])
      if extra_metrics:
        m.update(extra_metrics(prompts, texts))
      if cfg.ppo.sample_every and it % cfg.ppo.sample_every == 0:
        writer.write_text(it, "samples", "\n".join(f"{p!r} -> {r!r}" for p, r in zip(prompts[:4], texts)))
      writer.write(it, m)
      last = m
      if it % cfg.train.checkpoint_every == 0 or it == cfg.train.num_steps:
        extra = {"prompts": prompt_loader.get_state(), "kl": ctl.state_dict(),
                 "ptx": ptx_loader.get_state() if ptx_loader else None}
        ckpt.save(it, state, {"data": extra, "meta": meta})
  finally:
    ckpt.close()
    writer.close()
  last.update(progress.rates(cfg.train.num_steps))
  return last
