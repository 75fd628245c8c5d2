"""The newer update paths on a 4-device mesh (data 2 × fsdp 2) equal one device: GRPO/DAPO scoring + update, a DPO
step, a LoRA train step on its frozen base, LoRA PPO; and PPO's reference with adapters off is the SFT model.

(The 8-device meshes of every path, tensor parallelism included, are tests/mesh_driver.py's, via test_mesh.py.)
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fixtures
from rlhf_jax import data, dpo, lora, losses, metrics, parallel, ppo, stages, trainer
from rlhf_jax.model import boxed_params, init_params, logical_axes
from test_grpo import GRPO_VARIANTS, MODELS as GRPO_MODELS, SCORES, _grpo_hyper
from test_ppo import CFG as PPO_CFG, _hyper, _nets, _ptx, _samples
from test_trainer import CFG, _batch

SPEC = lora.Spec(rank=2, alpha=4.0, targets=("attn", "mlp"))
LORA_MODELS = ppo.Models(PPO_CFG, PPO_CFG, PPO_CFG, SPEC, "ref")


def mesh_of(n: int):
  """The first n local devices: data 2 × fsdp 2 for n = 4 (parameters and optimizer state really sharded)."""
  return parallel.make_mesh({"fsdp": 2} if n == 4 else None, jax.local_devices()[:n])


def placed(mesh, tree, axes=None):
  """`tree` on `mesh`: laid out by its logical `axes` (a tree prefix of PartitionSpecs), else replicated."""
  sh = (parallel.state_shardings(mesh, tree, axes) if axes is not None
        else jax.tree.map(lambda _: parallel.replicated(mesh), tree))
  return parallel.shard_tree(tree, sh)


POLICY_AXES = logical_axes(lambda: boxed_params(PPO_CFG, jax.random.PRNGKey(0)))


# ------------------------------------------------------------------------------------------------ GRPO / DAPO


def _grpo_on(n, hyper, tx):
  """Score + a two-epoch GRPO update of test_ppo's hand-made rollout on n devices; host outputs."""
  policy, _, _ = _nets()
  params = ppo.Trainable(policy=policy, value=None)
  state = ppo.PPOState(jnp.int32(0), params, tx.init(params), jax.random.PRNGKey(3))
  frozen = ppo.Frozen(ref=init_params(PPO_CFG, jax.random.PRNGKey(9)), reward=None)

  def step(state, frozen, samples, kl, score):
    rollout, sums = ppo.score_rollout(state.params, frozen, samples, kl, 0.0, score, models=GRPO_MODELS, ppo=hyper)
    new, usums = ppo.ppo_update(state, rollout, None, kl, tx=tx, models=GRPO_MODELS, ppo=hyper)
    return rollout, sums, new.params, usums

  mesh = mesh_of(n)
  state = placed(mesh, state, ppo.Trainable(policy=POLICY_AXES, value=None))
  rollout, sums, new, usums = parallel.to_host(parallel.jit(step, None, None)(
      state, placed(mesh, frozen, ppo.Frozen(ref=POLICY_AXES, reward=None)),
      parallel.put_batch(mesh, _samples(policy)), np.float32(0.5), parallel.put_batch(mesh, SCORES)))
  return dict(rollout=rollout, sums=sums, params=new, usums=usums, start=params)


@pytest.mark.parametrize("variant", sorted(GRPO_VARIANTS))
def test_grpo_update_on_four_devices_equals_one_device(variant):
  hyper, tx = _grpo_hyper(**GRPO_VARIANTS[variant]), optax.sgd(0.5)
  four, one = _grpo_on(4, hyper, tx), _grpo_on(1, hyper, tx)
  m1, u1 = fixtures.assert_update_matches(four, one)
  assert u1["loss_kl"] > 0  # kl_in="loss" (grpo's default): the k3 term is in the loss
  r = one["rollout"]
  if hyper.drop_equal_groups:  # rows 2, 3 (equal scores) leave the loss; one group of four dropped
    assert m1["dropped_groups"] == 0.25
    assert np.all(r.mask_BxT[2:4] == 0) and np.all(r.mask_BxT[[0, 1, 4, 5, 6, 7]].sum(1) > 0)
    centred = SCORES - np.repeat(SCORES.reshape(4, 2).mean(1), 2)
    want = centred / (np.std(SCORES, ddof=1) + 1e-4)  # scale_rewards="batch" over the whole batch's scores
  else:
    want = SCORES - np.repeat(SCORES.reshape(4, 2).mean(1), 2)  # "none": Dr. GRPO
  valid = np.asarray(_samples(one["start"].policy).mask_BxT) > 0
  np.testing.assert_allclose(r.advantages_BxT, np.where(valid, want[:, None], 0.0), atol=1e-5)


def test_grpo_first_epoch_loss_equals_the_hand_aggregation():
  """Epoch 1 starts at the rollout's params (ρ = 1): the grpo policy loss is the mean over the six kept sequences
  of (−A_b + β·mean_t k3_bt), A from the rollout and k3 from its reference log-probs."""
  hyper = _grpo_hyper(**GRPO_VARIANTS["grpo_seq_batch_dropped"])
  one = _grpo_on(1, dataclasses.replace(hyper, ppo_epochs=1), optax.sgd(0.5))
  r, u = one["rollout"], metrics.summarize(one["usums"])
  m = np.asarray(r.mask_BxT) > 0
  d = np.float64(r.ref_logp_BxT) - np.float64(r.old_logp_BxT)
  k3 = np.where(m, np.exp(d) - d - 1, 0.0)
  per_seq = [(-r.advantages_BxT[b][m[b]].mean() + 0.5 * k3[b][m[b]].mean()) for b in range(8) if m[b].any()]
  assert len(per_seq) == 6
  assert u["policy_loss"] == pytest.approx(np.mean(per_seq), abs=1e-5)
  assert u["clipfrac"] == 0.0


# ------------------------------------------------------------------------------------------------ DPO


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return fixtures.pipeline(tmp_path_factory)


def test_dpo_step_on_four_devices_equals_one_device(pipe, tmp_path):
  cfg = dpo.config()
  cfg.data.update(seq_len=48, batch_size=8, max_responses=2)
  cfg.opt.update(warmup_steps=0, lr=1e-3)
  model, sft, tok = stages.load_policy(pipe["sft"])
  ref = dpo.reference_logps(sft, model, tok, [pipe["comparisons"]], cfg, str(tmp_path))
  rng = np.random.default_rng(0)  # a reference away from the policy: implicit rewards not tied at ~0 (accuracy's
  ref = {k: v + rng.normal(0.0, 1.0, np.shape(v)).astype(np.float32) for k, v in ref.items()}  # sign is then stable)
  loader = data.make_comparison_loader(pipe["comparisons"], tok, 48, 8, 2, 0, str(tmp_path),
                                       record_values=lambda r: {"ref_logp": ref[r["origin"]]})
  batch = next(loader)
  pairs_per_device = (batch["valid"].reshape(4, -1).sum(1) / 2)
  assert len(set(pairs_per_device)) > 1  # devices really hold different numbers of pairs
  tx = dpo._optimizer(cfg, on_the_fly=False)
  state = trainer.create_state({"policy": sft}, tx, 0)
  loss_fn = functools.partial(losses.dpo_pair_loss, cfg=model, beta=0.1)
  axes = {"policy": logical_axes(lambda: boxed_params(model, jax.random.PRNGKey(0)))}

  def on(n):
    mesh = mesh_of(n)
    sh = parallel.state_shardings(mesh, state, axes)
    p_train, _ = trainer.compile_steps(loss_fn, mesh, sh)
    new, sums = p_train(parallel.shard_tree(state, sh), parallel.put_batch(mesh, batch))
    return parallel.to_host(new.params), metrics.summarize(parallel.to_host(sums))

  (p4, m4), (p1, m1) = on(4), on(1)
  fixtures.close_trees(p4, p1, 1e-6)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves({"policy": sft})))
  assert moved > 1e-4
  for k in m1:
    assert abs(m4[k] - m1[k]) < 1e-5, k


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_step_on_four_devices_equals_one_device():
  base = init_params(CFG, jax.random.PRNGKey(0))
  tx = optax.adam(1e-2)
  state = trainer.create_state(lora.split(base, SPEC, jax.random.PRNGKey(1))[0], tx, seed=0)
  loss = lora.with_base(functools.partial(losses.lm_loss, cfg=CFG), SPEC)
  base_axes = logical_axes(lambda: boxed_params(CFG, jax.random.PRNGKey(0)))
  axes = {"adapters": lora.adapter_axes(base_axes, state.params["adapters"], SPEC)}
  out = {}
  for n in (4, 1):
    mesh = mesh_of(n)
    sh = parallel.state_shardings(mesh, state, axes)
    frozen_sh = parallel.param_shardings(mesh, base, base_axes)
    p_train, _ = trainer.compile_steps(loss, mesh, sh, frozen_sh)
    frozen, batch = parallel.shard_tree(base, frozen_sh), parallel.put_batch(mesh, _batch(3))
    new, _ = p_train(parallel.shard_tree(state, sh), batch, frozen)
    new, _ = p_train(new, batch, frozen)  # two steps: A moves too once B is nonzero
    out[n] = parallel.to_host(new.params)
  for a, b, s in zip(jax.tree.leaves(out[4]), jax.tree.leaves(out[1]), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.max(np.abs(a - s)) > 0


def _lora_nets():
  """(trainable adapters with nonzero B, frozen {ref, reward}): the policy differs from its reference."""
  sft, value, reward = _nets()
  k1, k2 = jax.random.split(jax.random.PRNGKey(5))
  bump = lambda t: jax.tree.map(lambda x: x + 0.05 * jax.random.normal(k2, x.shape), t)
  pol = {"adapters": bump(lora.init(sft, SPEC, k1))}
  val = {"adapters": bump(lora.init(sft, SPEC, k2)), "head": value["head"]}
  return ppo.Trainable(policy=pol, value=val), ppo.Frozen(ref=sft, reward=reward)


def test_ppo_reference_logprobs_with_adapters_off_are_the_sft_models():
  """Samples carrying the SFT model's log-probs: k1 KL against the reference is 0 although the adapters are not."""
  params, frozen = _lora_nets()
  samples = _samples(frozen.ref)
  _, sums = jax.jit(functools.partial(ppo.score_rollout, models=LORA_MODELS, ppo=_hyper()))(
      params, frozen, samples, np.float32(0.1), np.float32(0.0))
  assert abs(float(sums["kl_k1"][0])) < 1e-5
  merged = ppo.effective(params, frozen, LORA_MODELS).policy
  assert float(jnp.abs(ppo.response_logits(merged, PPO_CFG, samples.sequence_BxPT, samples.sequence_mask_BxPT,
                                           samples.positions_BxPT, 6)[0] -
                       ppo.response_logits(frozen.ref, PPO_CFG, samples.sequence_BxPT, samples.sequence_mask_BxPT,
                                           samples.positions_BxPT, 6)[0]).max()) > 1e-3


def _lora_update_on(n, tx):
  params, frozen = _lora_nets()
  state = ppo.PPOState(jnp.int32(0), params, tx.init(params), jax.random.PRNGKey(3))
  policy = ppo.effective(params, frozen, LORA_MODELS).policy
  hyper = _hyper(ptx_coef=0.5)

  def fn(state, frozen, samples, ptx):
    rollout, _ = ppo.score_rollout(state.params, frozen, samples, 0.1, 0.2, models=LORA_MODELS, ppo=hyper)
    return ppo.ppo_update(state, rollout, ptx, frozen=frozen, tx=tx, models=LORA_MODELS, ppo=hyper)[0].params

  mesh = mesh_of(n)
  trained, frozen_axes = ppo.network_axes(LORA_MODELS, frozen.reward, frozen.reward, params)
  out = parallel.jit(fn, None, None)(placed(mesh, state, trained), placed(mesh, frozen, frozen_axes),
                                     parallel.put_batch(mesh, _samples(policy)), parallel.put_batch(mesh, _ptx()))
  return parallel.to_host(out), params


def test_lora_ppo_update_on_four_devices_equals_one_device():
  tx = optax.sgd(1.0)
  (four, start), (one, _) = _lora_update_on(4, tx), _lora_update_on(1, tx)
  for a, b, s in zip(jax.tree.leaves(four), jax.tree.leaves(one), jax.tree.leaves(start)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert max(float(np.abs(a - s).max()) for a, s in zip(jax.tree.leaves(one), jax.tree.leaves(start))) > 1e-3
