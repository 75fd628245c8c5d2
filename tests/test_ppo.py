"""PPO-ptx: 4-device update == 1-device update, ptx term, lr = 0, KL penalty, toy reward, end-to-end run + resume."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fixtures
from rlhf_jax import checkpoint, losses, metrics, parallel, ppo, sampling, stages
from rlhf_jax.model import Transformer, TransformerConfig, boxed_params, init_params, logical_axes

CFG = TransformerConfig(vocab_size=16, d_model=32, num_heads=2, num_kv_heads=2, d_ff=64, num_layers=1, max_len=16)
PAD, EOS = 0, 3


def _hyper(**kw):
  h = dict(kl_estimator="k1", gamma=1.0, lam=0.95, clip_eps=0.2, vf_clip=0.2, vf_coef=0.5, ptx_coef=0.0,
           whiten_advantages=True, ppo_epochs=1, minibatches=1)
  h.update(kw)
  return ppo.Hyper(**h)


def _nets(seed=0):
  """(policy params, value params {"backbone", "head"}, reward params), all small random networks."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
  value = stages.fresh_reward_params(CFG, k2, backbone=init_params(CFG, k3))
  return init_params(CFG, k1), value, stages.fresh_reward_params(CFG, k4)


# ------------------------------------------------------------------------------------- hand-made rollout inputs

PROMPT_LENS = (4, 2, 3, 1, 4, 4, 2, 3)
RESPONSE_LENS = (6, 1, 2, 2, 5, 6, 3, 1)  # per device of 4 (2 rows each): 7, 4, 11, 4 response tokens


def _samples(policy, P=4, T=6):
  """A sampling.Samples batch of 8 left-padded prompts and responses of different lengths (pad after EOS), with the
  log-probs and entropies of `policy` (as the sampler returns them) from a full forward."""
  rng = np.random.default_rng(0)
  B = len(PROMPT_LENS)
  seq, seg, pos = np.full((B, P + T), PAD, np.int32), np.zeros((B, P + T), np.int32), np.zeros((B, P + T), np.int32)
  for b, (p, t) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
    seq[b, P - p:P + t] = rng.integers(4, CFG.vocab_size, p + t)
    seq[b, P + t - 1] = EOS if t < T else seq[b, P + t - 1]
    seg[b, P - p:P + t] = 1
    pos[b, P - p:P] = np.arange(p)
    pos[b, P:] = p + np.arange(T)
  mask = seg[:, P:]
  logits = ppo.response_logits(policy, CFG, seq, seg, pos, T)[0]
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
  picked = np.take_along_axis(logp, seq[:, P:, None], axis=-1)[..., 0]
  entropy = -np.sum(np.exp(logp) * logp, axis=-1)
  return sampling.Samples(tokens_BxT=seq[:, P:], logprobs_BxT=(picked * mask).astype(np.float32),
                          sampling_logprobs_BxT=np.zeros((B, T), np.float32),
                          entropy_BxT=(entropy * mask).astype(np.float32), mask_BxT=mask,
                          lengths_B=mask.sum(1).astype(np.int32), ended_with_eos_B=mask.sum(1) < T,
                          sequence_BxPT=seq, sequence_mask_BxPT=seg, positions_BxPT=pos)


def _ptx(L=8):
  """Packed LM rows whose loss masks differ per device (one row fully masked)."""
  rng = np.random.default_rng(1)
  tokens = rng.integers(4, CFG.vocab_size, (8, L + 1)).astype(np.int32)
  counts = (8, 0, 3, 5, 8, 8, 1, 2)
  mask = (np.arange(L)[None] < np.array(counts)[:, None]).astype(np.float32)
  positions = np.tile(np.arange(L, dtype=np.int32), (8, 1))
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
          "segment_ids": np.ones((8, L), np.int32), "loss_mask": mask}


C_PTX = 0.5
MODELS = ppo.Models(CFG, CFG, CFG)
H_PTX, H_NOPTX = _hyper(ptx_coef=C_PTX), _hyper(ptx_coef=0.0)  # one epoch, one minibatch
TX = optax.sgd(1.0)  # params − grads: the step is the gradient itself


def _score_and_update(state, frozen, samples, kl, offset, ptx, *, both: bool):
  """Per device: the scored rollout and one PPO-ptx update (and, if `both`, the same update with ptx_coef = 0)."""
  rollout, sums = ppo.score_rollout(state.params, frozen, samples, kl, offset, models=MODELS, ppo=H_PTX)
  new, usums = ppo.ppo_update(state, rollout, ptx, tx=TX, models=MODELS, ppo=H_PTX)
  out = dict(rollout=rollout, sums=sums, params=new.params, usums=usums)
  if both:
    out["params_noptx"] = ppo.ppo_update(state, rollout, ptx, tx=TX, models=MODELS, ppo=H_NOPTX)[0].params
  return out


POLICY_AXES = logical_axes(lambda: boxed_params(CFG, jax.random.PRNGKey(0)))
RM_AXES = stages.reward_axes(CFG)


def _sharded(mesh, state, frozen):
  """(state, frozen) laid out on `mesh` by their logical axes."""
  sh = parallel.state_shardings(mesh, state, ppo.Trainable(policy=POLICY_AXES, value=RM_AXES))
  fsh = parallel.state_shardings(mesh, frozen, ppo.Frozen(ref=POLICY_AXES, reward=RM_AXES))
  return parallel.shard_tree(state, sh), parallel.shard_tree(frozen, fsh), sh


def _on_devices(n):
  """Runs `_score_and_update` compiled over the first n local devices (n = 4: data 2 × fsdp 2); host outputs."""
  policy, value, reward = _nets()
  params = ppo.Trainable(policy=policy, value=value)
  state = ppo.PPOState(jnp.int32(0), params, TX.init(params), jax.random.PRNGKey(3))
  frozen = ppo.Frozen(ref=init_params(CFG, jax.random.PRNGKey(9)), reward=reward)
  mesh = parallel.make_mesh({"fsdp": 2} if n == 4 else None, jax.local_devices()[:n])
  state, frozen, _ = _sharded(mesh, state, frozen)
  fn = parallel.jit(functools.partial(_score_and_update, both=n == 4), None, None)
  out = parallel.to_host(fn(state, frozen, parallel.put_batch(mesh, _samples(policy)), np.float32(0.1),
                            np.float32(0.2), parallel.put_batch(mesh, _ptx())))
  out["start"] = jax.device_get(params)
  return out


@pytest.fixture(scope="module")
def updates():
  assert jax.local_device_count() == 4
  return {n: _on_devices(n) for n in (4, 1)}


def test_four_device_update_equals_one_device_update_on_the_full_batch(updates):
  four, one = updates[4], updates[1]
  per_device_tokens = np.asarray(RESPONSE_LENS).reshape(4, 2).sum(1)
  assert len(set(per_device_tokens)) > 1  # devices really hold different numbers of response tokens
  fixtures.assert_update_matches(four, one)  # incl. advantages whitened over all devices


def test_update_losses_are_means_over_all_devices_tokens(updates):
  r = updates[4]["rollout"]
  mask = np.asarray(r.mask_BxT)
  np.testing.assert_array_equal(mask.sum(1), RESPONSE_LENS)
  adv = np.asarray(r.advantages_BxT)[mask > 0]
  assert abs(adv.mean()) < 1e-5 and abs(adv.var() - 1.0) < 1e-3  # whitened over all 26 tokens
  assert np.all(np.asarray(r.advantages_BxT)[mask == 0] == 0)
  # one epoch of one minibatch starts at the rollout's own params: ratio = 1 and V = V_old, so the losses are
  # means over all 26 valid tokens of all devices: policy −mean(A), value ½·mean((V_old − R)²); ptx: token mean
  m = metrics.summarize(updates[4]["usums"])
  ret, old_v = np.asarray(r.returns_BxT), np.asarray(r.old_values_BxT)
  expected_vf = 0.5 * np.sum(mask * (old_v - ret) ** 2) / mask.sum()
  assert expected_vf > 1e-3
  assert abs(m["value_loss"] - expected_vf) < 1e-5 * max(1.0, expected_vf)
  assert abs(m["policy_loss"] + adv.mean()) < 1e-5
  assert m["clipfrac"] == 0.0 and m["approx_kl"] < 1e-10
  assert abs(m["ptx_loss"] - float(jax.jit(_ptx_mean_loss)(updates[4]["start"].policy))) < 1e-5


def test_score_rollout_takes_old_logprobs_and_entropy_from_the_samples(updates):
  """No fourth forward: the rollout's old log-probs are the sampler's, the entropy metric their token mean."""
  samples = _samples(updates[4]["start"].policy)
  r = updates[4]["rollout"]
  np.testing.assert_array_equal(r.old_logp_BxT, samples.logprobs_BxT)
  mask = samples.mask_BxT
  want = float(np.sum(samples.entropy_BxT * mask) / mask.sum())
  assert want > 0.5 and abs(ppo._host_metrics(updates[4]["sums"])["entropy"] - want) < 1e-6 * want


def _ptx_mean_loss(policy):
  """Global mean next-token NLL of the ptx batch over its loss mask, written out by hand."""
  b = _ptx()
  logits, _ = Transformer(CFG).apply({"params": policy}, b["inputs"], b["positions"], b["segment_ids"])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
  return jnp.sum(nll * b["loss_mask"]) / np.sum(b["loss_mask"])


def test_ptx_coef_changes_the_step_only_by_c_times_the_ptx_lm_gradient(updates):
  u = updates[4]
  grad = jax.jit(jax.grad(_ptx_mean_loss))(u["start"].policy)
  # one SGD(lr=1) step each: params_c − params_0 = −c·∇(mean ptx LM loss); the value params never see ptx
  diff = jax.tree.map(lambda a, b: a - b, u["params"].policy, u["params_noptx"].policy)
  expected = jax.tree.map(lambda g: -C_PTX * np.asarray(g), grad)
  fixtures.close_trees(diff, expected, 2e-6)
  assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(expected)) > 1e-3
  fixtures.close_trees(u["params"].value, u["params_noptx"].value, 0.0)


# ------------------------------------------------------------------------------------- toy reward: count of token X

X, P_TOY, T_TOY, B_TOY, ITERS = 5, 4, 8, 32, 8
H_TOY = _hyper(ppo_epochs=2, minibatches=2)


def _count_scorer(params, tokens_NxL, positions_NxL, segment_ids_NxL, last_idx_N, response_mask_NxL=None, *, cfg):
  """Stand-in reward model: how many response tokens equal X."""
  del params, positions_NxL, last_idx_N, response_mask_NxL, cfg
  hit_NxT = (tokens_NxL[:, -T_TOY:] == X) & (segment_ids_NxL[:, -T_TOY:] > 0)
  return jnp.sum(hit_NxT, axis=1).astype(jnp.float32)


def _exact_kl(policy, ref, samples):
  """Mean over valid response slots of the full KL(π(·|s) ‖ π_ref(·|s)), summed over the vocabulary."""
  s = parallel.to_host(samples)
  logp = [jax.nn.log_softmax(ppo.response_logits(p, CFG, s.sequence_BxPT, s.sequence_mask_BxPT, s.positions_BxPT,
                                                 T_TOY)[0], axis=-1) for p in (policy, ref)]
  kl_BxT = np.sum(np.exp(logp[0]) * (logp[0] - logp[1]), axis=-1)
  return float(np.sum(kl_BxT * s.mask_BxT) / np.sum(s.mask_BxT))


def _toy_run(kl_coef, fns, tx):
  """ITERS iterations of sample -> score (count of X, KL-shaped) -> PPO update from the same random policy."""
  mesh, sampler, p_score, p_update = fns
  policy, value, _ = _nets(seed=1)
  params = ppo.Trainable(policy=policy, value=value)
  state = ppo.PPOState(jnp.int32(0), params, tx.init(params), jax.random.PRNGKey(0))
  state, frozen, _ = _sharded(mesh, state, ppo.Frozen(ref=policy, reward=None))
  rng = np.random.default_rng(0)
  scores, kls = [], []
  for it in range(ITERS + 1):
    prompts = parallel.put_batch(mesh, rng.integers(4, CFG.vocab_size, (B_TOY, P_TOY)).astype(np.int32))
    samples = sampler(state.params.policy, prompts, jnp.ones_like(prompts), jax.random.PRNGKey(it))
    rollout, sums = p_score(state.params, frozen, samples, np.float32(kl_coef), np.float32(0.0))
    scores.append(ppo._host_metrics(parallel.to_host(sums))["score"])
    kls.append(_exact_kl(parallel.to_host(state.params.policy), policy, samples))
    if it < ITERS:  # the last rollout only measures
      state, _ = p_update(state, rollout, None)
  return {"score": scores, "kl": kls}


@pytest.fixture(scope="module")
def toy_runs():
  """The same toy PPO run with kl_coef 0 and a large kl_coef (one compilation serves both: β is traced)."""
  tx = optax.adam(1e-2)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(losses, "sequence_scores", _count_scorer)
    mesh = parallel.make_mesh()
    policy, value, _ = _nets(seed=1)
    params = ppo.Trainable(policy=policy, value=value)
    _, _, sh = _sharded(mesh, ppo.PPOState(jnp.int32(0), params, tx.init(params), jax.random.PRNGKey(0)),
                        ppo.Frozen(ref=policy, reward=None))
    fns = (mesh, sampling.make_sampler(mesh, CFG, max_new_tokens=T_TOY, eos_id=EOS, pad_id=PAD),
           *ppo.compile_steps(mesh, sh, tx, MODELS, H_TOY))
    return {beta: _toy_run(beta, fns, tx) for beta in (0.0, 2.0)}


def test_toy_reward_rises(toy_runs):
  score = toy_runs[0.0]["score"]  # mean count of X per response, before each update and after the last
  assert score[0] < 1.0 and np.mean(score[-2:]) > score[0] + 2.0, score


def test_large_kl_coef_keeps_the_policy_near_the_reference(toy_runs):
  free, tied = toy_runs[0.0], toy_runs[2.0]
  assert free["kl"][0] == tied["kl"][0] == 0.0  # both start at the reference
  assert free["kl"][-1] > 0.5, free["kl"]  # without the penalty the count reward drags the policy away
  assert max(tied["kl"]) < 0.2 * free["kl"][-1], (tied["kl"], free["kl"])
  assert np.mean(tied["score"][-2:]) < np.mean(free["score"][-2:]) - 2.0


# ------------------------------------------------------------------------------------- experiments/ppo.py end to end


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return fixtures.pipeline(tmp_path_factory)


def _ppo_flags(pipe, steps):
  return {"train.init_from": pipe["sft"], "ppo.reward_from": pipe["rm"], "data.prompts": pipe["rl_prompts"],
          "data.ptx": pipe["corpus"], "data.prompt_len": 24, "data.ptx_seq_len": 32, "data.ptx_batch_size": 8,
          "ppo.max_new_tokens": 8, "ppo.rollout_batch": 8, "ppo.sample_every": 1, "train.num_steps": steps,
          "train.checkpoint_every": 1, "opt.lr": 0.0}


def _sample_steps(workdir):
  with open(os.path.join(workdir, "samples.txt")) as f:
    return [int(line.split()[2]) for line in f if line.startswith("== step")]


def test_ppo_main_with_zero_lr_keeps_the_sft_policy_and_resumes(pipe, tmp_path):
  """experiments/ppo.py with opt.lr=0: KL to the SFT reference is 0 and the checkpointed policy is the SFT policy;
  a second run with more iterations resumes after the last checkpoint instead of redoing iterations."""
  wd, cache = str(tmp_path / "ppo"), pipe["jax_cache"]
  first = fixtures.run_main("ppo", wd, _ppo_flags(pipe, 2), cache)
  assert first.returncode == 0, first.stderr[-3000:]
  rows = metrics.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    # the policy is the reference; old log-probs come from the sampler's decode path, the reference's from a full
    # forward: they differ by float32 rounding only
    assert abs(r["kl"]) < 1e-5 and abs(r["kl_k1"]) < 1e-5 and r["approx_kl"] < 1e-10, r
    assert np.isfinite(r["score"]) and r["ptx_loss"] > 0 and r["response_length"] > 0
  assert checkpoint.Checkpointer(wd, create=False).manager.all_steps() == [1, 2]
  params, extra = checkpoint.load_params(wd)
  assert extra["meta"]["stage"] == "ppo"
  fixtures.close_trees(params["policy"], checkpoint.load_params(pipe["sft"])[0], 0.0)
  fixtures.close_trees(params["value"], checkpoint.load_params(pipe["rm"])[0], 0.0)  # value_init="reward"

  second = fixtures.run_main("ppo", wd, _ppo_flags(pipe, 3), cache)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "ppo: resumed at iteration 2" in second.stderr
  again = metrics.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["step"] for r in again] == [1, 2, 3]
  assert again[:2] == rows  # byte-identical rows, timings included: iterations 1-2 were not rerun
  assert abs(again[2]["kl"]) < 1e-5
  assert _sample_steps(wd) == [1, 2, 3]  # samples.txt is appended to: a rerun iteration would repeat its step
  assert checkpoint.Checkpointer(wd, create=False).manager.all_steps() == [2, 3]


def _reward_fn_cfg(pipe, workdir_steps):
  from experiments.configs import ppo as ppo_config
  cfg = ppo_config.get_config()
  for key, value in {**_ppo_flags(pipe, workdir_steps), "ppo.reward_from": "", "ppo.value_init": "sft"}.items():
    group, field = key.split(".")
    cfg[group][field] = value
  return cfg


def test_reward_fn_replaces_the_reward_model(pipe, tmp_path):
  """ppo.run(reward_fn=...) scores each rollout with the given function (no RM needed with value_init="sft"):
  the logged score is that function's mean over the iteration's decoded responses."""
  seen = []
  def extra(prompts, responses):
    seen.append([len(r) - r.count(" ") for r in responses])
    return {}
  reward_fn = lambda prompts, responses: np.array([len(r) - r.count(" ") for r in responses], np.float32)
  ppo.run(_reward_fn_cfg(pipe, 2), str(tmp_path / "ppo"), extra_metrics=extra, reward_fn=reward_fn)
  rows = metrics.read_jsonl(str(tmp_path / "ppo" / "metrics.jsonl"))
  assert len(rows) == len(seen) == 2
  for r, lengths in zip(rows, seen):
    assert r["score"] == pytest.approx(np.mean(lengths), abs=1e-5), (r["score"], lengths)
  _, extra_meta = checkpoint.load_params(str(tmp_path / "ppo"))
  assert extra_meta["meta"]["reward"].startswith("reward_fn")


def test_reward_fn_without_rm_needs_value_init_sft(pipe, tmp_path):
  cfg = _reward_fn_cfg(pipe, 1)
  cfg.ppo.value_init = "reward"
  with pytest.raises(ValueError, match="ppo.reward_from is empty.*value_init='sft'"):
    ppo.run(cfg, str(tmp_path / "ppo"), reward_fn=lambda p, r: np.zeros(len(r)))
  cfg.ppo.group_size = 2  # RLOO has no value network to initialise: a reward function is all it needs
  ppo.run(cfg, str(tmp_path / "rloo"), reward_fn=lambda p, r: np.zeros(len(r)))
  with pytest.raises(ValueError, match="ppo.reward_from is empty: give the reward-model workdir$"):
    ppo.run(cfg, str(tmp_path / "ppo"))


def test_group_baselined_subtracts_the_leave_one_out_mean_of_each_group():
  score = np.array([1.0, 2.0, 6.0, 10.0, 10.0, 13.0], np.float32)
  want = [s - (sum(g) - s) / 2 for g in (score[:3], score[3:]) for s in g]  # groups of 3
  np.testing.assert_allclose(ppo.group_baselined(jnp.asarray(score), 3), want, rtol=1e-6)
  shifted = score + np.repeat([5.0, -7.0], 3)  # a per-prompt offset (invisible to a Bradley–Terry RM) cancels
  np.testing.assert_allclose(ppo.group_baselined(jnp.asarray(shifted), 3), want, rtol=1e-6)


def test_group_size_samples_each_prompt_group_size_times(pipe, tmp_path):
  seen = []
  cfg = _reward_fn_cfg(pipe, 1)
  cfg.ppo.group_size = 2
  ppo.run(cfg, str(tmp_path / "ppo"), extra_metrics=lambda p, r: seen.append(p) or {},
          reward_fn=lambda p, r: np.arange(len(r), dtype=np.float32))
  (prompts,) = seen
  assert len(prompts) == cfg.ppo.rollout_batch and prompts[0::2] == prompts[1::2]
  assert len(set(prompts)) > 1
  row = metrics.read_jsonl(str(tmp_path / "ppo" / "metrics.jsonl"))[0]
  assert row["score"] == pytest.approx(np.mean(np.arange(len(prompts))))  # logged: the raw score
  assert row["value_loss"] == 0.0 and row["grad_norm"] > 0  # RLOO: no critic is trained
  params, _ = checkpoint.load_params(str(tmp_path / "ppo"))
  assert params.get("value") is None and "policy" in params  # nor built or checkpointed
  cfg.train.num_steps = 2  # and the critic-free state resumes
  ppo.run(cfg, str(tmp_path / "ppo"), reward_fn=lambda p, r: np.arange(len(r), dtype=np.float32))
  assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "ppo" / "metrics.jsonl"))] == [1, 2]
  cfg.ppo.group_size = 3
  with pytest.raises(ValueError, match="not divisible by ppo.group_size=3"):
    ppo.run(cfg, str(tmp_path / "ppo3"), reward_fn=lambda p, r: np.zeros(len(r)))
