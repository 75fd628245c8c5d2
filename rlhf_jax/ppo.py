"""PPO-ptx: rollout -> RM scores -> per-token KL-shaped rewards -> GAE -> one compiled PPO update.

Objective (InstructGPT): maximise E_{x~D_RL, y~π}[RM(x,y) − β·log(π(y|x)/π_SFT(y|x))] + γ·E_{x~D_pretrain}[log π(x)].
Per token t of a response: r_t = −β·kl_t (+ RM score on the last token), kl_t from `rl.kl_estimate` with the
configured estimator (k1 = log π − log π_SFT by default). GAE(γ_rl, λ) on the value network's V_t; advantages
optionally whitened over the whole rollout batch. The update scans epochs × minibatches in one jit:
L = L_clip(ρ, A, ε) + c_vf·L_V(ε_vf) − γ·(1/N_ptx)·Σ log π(x_ptx). Score and update are written for the global
batch and compiled over the device mesh (parallel.jit): all four networks sharded by their logical axes.
The critic-free methods (`ppo.advantage`, see ppo_config.py) sample every prompt G = `ppo.group_size` times:
RLOO's advantage is the RM score minus the mean of the other G − 1 scores of its prompt (a Bradley–Terry RM's
per-prompt level is arbitrary), then the reward-to-go of the KL-shaped rewards; GRPO's is `rl.group_advantages`
of the group's scores on every token, with β·k3 in the loss (`kl_in="loss"`) and the loss aggregated per
`loss_agg` (`rl.policy_loss_sums`). No critic: no value network is built, scored or trained (the update costs one
network's forward/backward instead of two). `run(reward_fn=...)` replaces the RM by a function.

Networks (InstructGPT's four): policy and value trained (`Trainable`), reference and reward model frozen
(`Frozen`). The value network is a Transformer + ScalarHead, initialised from the RM or from SFT + a new head.
With LoRA (`cfg.lora.rank` > 0) the trained groups are adapters: policy {"adapters"} on the frozen reference (the
reference is the base with the adapters off: one copy), value {"adapters", "head"} on the RM's backbone
(value_init="reward") or the reference ("sft"); `effective` attaches them inside every compiled function.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from rlhf_jax import advantages, checkpoint, data, lora, losses, metrics, optimizer, parallel, rl, sampling, trainer
from rlhf_jax.advantages import global_whiten, group_baselined  # noqa: F401  (re-exported)
from rlhf_jax.model import ScalarHead, Transformer, TransformerConfig
from rlhf_jax.ppo_config import Hyper, config, ppo_config  # noqa: F401  (re-exported: ppo.Hyper, ppo.config, ...)
from rlhf_jax.ppo_config import check_models, check_sources
from rlhf_jax.ppo_state import Frozen, Models, PPOState, Rollout, Trainable, effective, network_axes  # noqa: F401


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


def score_rollout(params: Trainable, frozen: Frozen, samples: sampling.Samples, kl_coef, score_offset, score_B=None, *,
                  models: Models, ppo) -> tuple[Rollout, dict]:
  """Reference log-probs, values, RM scores, shaped rewards, GAE, (whitened) advantages of the global batch.

  `samples` must come from `params.policy`: its old log-probs and entropy are the sampler's (`logprobs_BxT`,
  `entropy_BxT`, computed while decoding; equal to a full forward's to float32 rounding), so scoring runs three
  forwards (reference, value, reward), not four. A given `score_B` (per response) replaces the RM's score.
  """
  params = effective(params, frozen, models)
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
  adv_BxT, ret_BxT, loss_mask_BxT, keep_B = advantages.per_method(score_B, kl_BxT, values_BxT, mask_BxT, kl_coef,
                                                                  ppo)
  rollout = Rollout(seq, seg, pos, loss_mask_BxT, logp_BxT, ref_logp_BxT, values_BxT, adv_BxT, ret_BxT)
  B, n = jnp.float32(score_B.shape[0]), jnp.sum(mask_BxT)
  res_BxT = (ret_BxT - values_BxT) * mask_BxT
  sums = {"score": (jnp.sum(score_B), B), "score_sq": (jnp.sum(score_B ** 2), B),
          "kl": (jnp.sum(kl_BxT), B), "kl_k1": (jnp.sum(logp_BxT - ref_logp_BxT), B),
          "entropy": (jnp.sum(samples.entropy_BxT * mask_BxT), n),
          "response_length": (jnp.sum(samples.lengths_B), B),
          "ended_with_eos": (jnp.sum(samples.ended_with_eos_B), B),
          "ret": (jnp.sum(ret_BxT), n), "ret_sq": (jnp.sum(ret_BxT ** 2), n),
          "res": (jnp.sum(res_BxT), n), "res_sq": (jnp.sum(res_BxT ** 2), n)}
  if ppo.group_size > 1:
    groups = jnp.float32(score_B.shape[0] // ppo.group_size)
    sums["dropped_groups"] = (groups - jnp.sum(keep_B) / ppo.group_size, groups)
  return rollout, sums


def ppo_loss(params: Trainable, mb: dict, rng, *, models: Models, ppo):
  """Summed minibatch loss: the policy loss aggregated per `ppo.loss_agg` (numerator; its denominator is the
  count) + c_vf × the value loss's token mean × that count, + γ·ptx rescaled to the same count."""
  r: Rollout = mb["rollout"]
  params = effective(params, mb.get("frozen"), models)  # LoRA: the base is an input, never differentiated
  T = r.mask_BxT.shape[1]
  logits_BxTxV, _ = response_logits(params.policy, models.policy, r.sequence_BxS, r.segment_ids_BxS,
                                    r.positions_BxS, T)
  logp_BxT = rl.token_logprobs(logits_BxTxV, r.sequence_BxS[:, -T:])
  pg_num, count, pg_sums = rl.policy_loss_sums(
      logp_BxT, r.old_logp_BxT, r.ref_logp_BxT if ppo.kl_in == "loss" else None, r.advantages_BxT, r.mask_BxT,
      jnp.sum(r.mask_BxT, axis=1) > 0, clip_low=ppo.clip_low, clip_high=ppo.clip_high, kl_coef=mb["kl_coef"],
      loss_agg=ppo.loss_agg, ratio_level=ppo.ratio_level)
  pg = pg_num / jnp.maximum(count, 1.0)
  vf, vf_aux = jnp.float32(0.0), {"vf_clipfrac": jnp.float32(0.0)}  # critic-free (params.value None)
  if params.value is not None:
    values_BxT = values_of(params.value, models.value, r.sequence_BxS, r.segment_ids_BxS, r.positions_BxS, T)
    vf, vf_aux = rl.ppo_value_loss(values_BxT, r.old_values_BxT, r.returns_BxT, r.mask_BxT, ppo.vf_clip)
  n = jnp.sum(r.mask_BxT)
  loss_sum = (pg + ppo.vf_coef * vf) * count
  aux = {"policy_loss": (pg * count, count), "value_loss": (vf * n, n), "vf_clipfrac": (vf_aux["vf_clipfrac"] * n, n),
         "clipfrac": (pg_sums["clipfrac_low"] + pg_sums["clipfrac_high"], n)}
  aux.update({k: (v, n) for k, v in pg_sums.items() if k != "kl"})
  if ppo.kl_in == "loss":
    aux["loss_kl"] = (pg_sums["kl"], n)  # token mean of k3(π‖π_ref) under the current policy
  if ppo.ptx_coef > 0:
    ptx_sum, ptx_aux = losses.lm_loss(params.policy, mb["ptx"], rng, cfg=models.policy)
    loss_sum = loss_sum + ppo.ptx_coef * ptx_sum * mb["ptx_scale"]
    aux["ptx_loss"] = ptx_aux["loss"]
  aux["loss"] = (loss_sum, count)
  return loss_sum, aux


def loss_count(mask_BxT, ppo):
  """The denominator of the policy loss: valid tokens (bnpo, dapo) or counted sequences (grpo, dr_grpo)."""
  if ppo.loss_agg in ("grpo", "dr_grpo"):
    return jnp.sum(jnp.sum(mask_BxT, axis=1) > 0).astype(jnp.float32)
  return jnp.sum(mask_BxT)


def _minibatches(tree, perm_b, M: int):
  """Permutes the leading axis and splits it into M equal minibatches: (b, ...) -> (M, b/M, ...), each minibatch
  split over the batch shards again (under parallel.jit; replicated where they do not divide b/M)."""
  return jax.tree.map(lambda x: parallel.constrain(x[perm_b].reshape((M, x.shape[0] // M) + x.shape[1:]),
                                                   (None, "activation_batch")), tree)


def ppo_update(state: PPOState, rollout: Rollout, ptx: dict | None, kl_coef=0.0, frozen: Frozen | None = None, *,
               tx: optax.GradientTransformation, models: Models, ppo) -> tuple[PPOState, dict]:
  """`ppo_epochs` × `minibatches` clipped PPO(-ptx) steps on the global batch in one nested lax.scan; metrics
  (sum, count). The key is fold_in(fold_in(rng, step), 0): device 0's under the former per-device pmap (one-device
  runs permute as before), and each epoch permutes the global batch, so results do not depend on the mesh.

  `kl_coef` (β, traced) weighs the k3 term of the loss when `ppo.kl_in == "loss"` (ignored otherwise); `frozen`
  (LoRA): the bases the adapters are merged into."""
  M, b = ppo.minibatches, rollout.mask_BxT.shape[0]
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)
  n_global = loss_count(rollout.mask_BxT, ppo)
  ptx_mbs = None
  if ptx is not None:  # one pretraining batch per iteration, split over the minibatches, reused each epoch
    ptx_mbs = _minibatches(ptx, jnp.arange(ptx["inputs"].shape[0]), M)
    ptx_scale = n_global / jnp.maximum(jnp.sum(ptx["loss_mask"]), 1.0)
  loss_fn = functools.partial(ppo_loss, models=models, ppo=ppo)

  def minibatch(carry, xs):
    params, opt_state = carry
    mb_rollout, mb_ptx, key = xs
    mb = {"rollout": mb_rollout, "kl_coef": kl_coef, "frozen": frozen}
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
  spec = lora.Spec.from_config(cfg.lora)
  mesh = parallel.make_mesh(cfg.mesh)
  check_sources(cfg, hyper, reward_fn is not None)
  critic = hyper.critic  # RLOO and GRPO have no value network
  prompt_files = stages.checked_files(cfg.data.prompts, "data.prompts")
  ptx_files = stages.checked_files(cfg.data.ptx, "data.ptx") if hyper.ptx_coef > 0 else None
  policy_cfg, sft_params, tok = stages.load_policy(cfg.train.init_from)
  tok = stages.chat_tokenizer(cfg, tok)
  rm_cfg, rm_params, offset = (stages.load_reward_model(cfg.ppo.reward_from) if cfg.ppo.reward_from
                                else (policy_cfg, None, 0.0))
  check_models(cfg, hyper, mesh, policy_cfg, rm_cfg)
  hosts = stages.loader_hosts()  # this host's index and count (its batch shards: per loader)
  prompt_loader = data.make_prompt_loader(prompt_files, tok, cfg.data.prompt_len,
                                          cfg.ppo.rollout_batch // hyper.group_size,
                                          cfg.data.seed, workdir, truncate_prompt=cfg.data.truncate,
                                          batch_field="ppo.rollout_batch / ppo.group_size",
                                          local_device_count=1, **hosts)  # prompts are repeated G times, then split
  ptx_loader = None
  if ptx_files:
    ptx_loader = data.make_lm_loader(ptx_files, tok, cfg.data.ptx_seq_len, cfg.data.ptx_batch_size, cfg.data.seed,
                                     workdir, batch_field="data.ptx_batch_size",
                                     **stages.loader_hosts(mesh))
    if parallel.check_divisible(cfg.data.ptx_batch_size, "config data.ptx_batch_size", mesh) % hyper.minibatches:
      raise ValueError(f"config data.ptx_batch_size={cfg.data.ptx_batch_size}: rows per batch shard must be "
                       f"divisible by ppo.minibatches={hyper.minibatches}")

  # ---- networks and state: resume > SFT/RM init
  if checkpoint.has_checkpoint(workdir):
    lora.check_resume(stages.source_meta(workdir).get("lora"), spec, workdir)
  if spec.enabled:  # the frozen reference (and RM) are the LoRA bases
    sft_params = lora.cast_base(sft_params, cfg.lora.base_dtype)
    rm_params = rm_params if rm_params is None else dict(rm_params, backbone=lora.cast_base(rm_params["backbone"],
                                                                                          cfg.lora.base_dtype))
  if not critic:
    value_cfg, value_params = policy_cfg, None
  elif cfg.ppo.value_init == "reward":
    value_cfg, value_params = rm_cfg, rm_params
  else:
    value_cfg = policy_cfg
    value_params = stages.fresh_reward_params(policy_cfg, jax.random.PRNGKey(cfg.train.seed), backbone=sft_params)
  models = Models(policy_cfg, value_cfg, rm_cfg, spec, "reward" if cfg.ppo.value_init == "reward" else "ref")
  num_updates = cfg.train.num_steps * hyper.ppo_epochs * hyper.minibatches
  tx = optimizer.make_optimizer(cfg.opt, num_updates)

  def trainable() -> Trainable:
    if not spec.enabled:
      return Trainable(policy=sft_params, value=value_params)
    k1, k2 = jax.random.split(jax.random.PRNGKey(cfg.train.seed))  # adapters (+ the value head) train
    return Trainable(policy=lora.split(sft_params, spec, k1)[0],
                     value=None if value_params is None else lora.split(value_params, spec, k2, "backbone")[0])

  fresh = lambda: PPOState(jnp.int32(0), trainable(), tx.init(trainable()), jax.random.PRNGKey(cfg.train.seed))
  ctl = _controller(cfg.ppo)
  stages.install_tokenizer(tok, workdir)
  abstract = jax.eval_shape(fresh)
  trained_axes, frozen_axes = network_axes(models, rm_params, value_params, abstract.params)
  state_sh = parallel.state_shardings(mesh, abstract, trained_axes)
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
    params = parallel.shard_tree(trainable(), state_sh.params)
    opt_state = parallel.jit(tx.init, (state_sh.params,), state_sh.opt_state)(params)
    state = PPOState(parallel.shard_tree(np.int32(0), state_sh.step), params, opt_state,
                     parallel.shard_tree(jax.random.PRNGKey(cfg.train.seed), state_sh.rng))
  meta = {"stage": "ppo", "model": dataclasses.asdict(policy_cfg), "sft": cfg.train.init_from,
          "reward": cfg.ppo.reward_from if reward_fn is None else f"reward_fn {getattr(reward_fn, '__name__', '')}"}
  if spec.enabled:
    meta.update(lora={**spec.meta(), "base_dtype": cfg.lora.base_dtype}, lora_base=cfg.train.init_from)

  # ---- compiled functions (over the mesh)
  logging.info("ppo: %s", parallel.describe_mesh(mesh))
  sampler = sampling.make_sampler(mesh, policy_cfg, max_new_tokens=cfg.ppo.max_new_tokens,
                                  temperature=cfg.ppo.temperature, top_k=cfg.ppo.top_k, top_p=cfg.ppo.top_p,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id)
  p_score, p_update = compile_steps(mesh, state_sh, tx, models, hyper)
  policy_sh = parallel.state_shardings(mesh, frozen.ref, frozen_axes.ref)
  p_policy = parallel.jit(lambda params, frozen: effective(params, frozen, models, merged=True).policy, None,
                          policy_sh)  # the sampler decodes the merged policy (the base's FLOPs per token)
  sft_params = rm_params = value_params = None  # the host copies go (the sharded ones live in state and frozen)
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
      policy = p_policy(state.params, frozen) if spec.enabled else state.params.policy
      samples = sampler(policy, sharded["prompt_tokens"], sharded["prompt_mask"], rng)
      jax.block_until_ready(samples.tokens_BxT)
      t1 = time.perf_counter()
      kl = np.float32(ctl.value)
      texts = None
      if extra_metrics or reward_fn or (cfg.ppo.sample_every and it % cfg.ppo.sample_every == 0):
        local = parallel.local_rows((samples.tokens_BxT, samples.lengths_B))  # this host's prompts' rows
        texts = [tok.decode(t[:n]) for t, n in zip(*local)]
      given = None
      if reward_fn is not None:
        given = parallel.put_batch(mesh, np.asarray(reward_fn(prompts, texts), np.float32).reshape(len(texts)),
                                   "config ppo.rollout_batch")
      rollout, score_sums = p_score(state.params, frozen, samples, kl, np.float32(offset), given)
      ptx = parallel.put_batch(mesh, next(ptx_loader), "config data.ptx_batch_size") if ptx_loader else None
      if it == cfg.train.nan_at_step:
        rollout = rollout.replace(advantages_BxT=rollout.advantages_BxT * np.nan)
      del policy  # LoRA: the merged copy is freed before the update
      state, update_sums = p_update(state, rollout, ptx, kl, frozen if spec.enabled else None)
      m = _host_metrics({**parallel.to_host(score_sums), **parallel.to_host(update_sums)})
      t2 = time.perf_counter()
      metrics.check_finite(m, it, "ppo")
      m.update(kl_coef=ctl.value, generation_s=t1 - t0, update_s=t2 - t1)
      ctl.update(m["kl"], cfg.ppo.rollout_batch)
      line = progress.update(it, float(np.sum(batch["prompt_mask"]) + m["response_length"] * len(prompts)))
      if it % cfg.train.log_every == 0 or it == cfg.train.num_steps:
        logging.info("ppo %s  score %.3f  kl %.3f  clipfrac %.3f (low %.3f high %.3f)", line, m["score"], m["kl"],
                     m["clipfrac"], m["clipfrac_low"], m["clipfrac_high"])
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
