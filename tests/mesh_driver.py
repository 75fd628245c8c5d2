"""Mesh equivalence on 8 simulated CPU devices, one subprocess for every case (compile time is the cost):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_driver.py OUT_DIR

For each mesh in MESHES ("one" = a single device) it runs 3 steps of pretraining (GPT-2 family, untied head),
SFT (LLaMA family, grouped-query attention, masked prompt targets) and the reward model (Bradley–Terry with the
likelihood feature and a token head), and 3 PPO-ptx iterations (sampler -> score -> scanned update with all four
networks: policy and value trained, reference and RM frozen), all through the library's compiled functions with
their shardings; then the newer paths: GRPO with DAPO's options (no critic, k3 in the loss, clip-higher, dynamic
sampling), DPO steps on precomputed reference log-probs, LoRA SFT steps on a frozen sharded base, and LoRA PPO
(adapters for policy and value, the reference = the base), these on NEWER_MESHES only. It writes OUT_DIR/<mesh>.npz (losses, metrics, sampled tokens, final parameters, the fraction of
each parameter a device holds) and a checkpoint: pretraining's state after 3 steps saved on the fsdp=8 mesh, then
restored on the data 4 × tensor 2 mesh and trained 3 more steps ("resumed.npz", vs "f8.npz"'s 6-step params).
tests/test_mesh.py asserts on these files (and restores the checkpoint again on 4 devices).
"""
from __future__ import annotations

import functools
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint, lora, losses, metrics, optimizer, parallel, ppo, sampling, stages, trainer
from rlhf_jax.model import TransformerConfig, boxed_params, init_params, logical_axes

MESHES = {"one": None, "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2}, "f8": {"fsdp": 8},
          "d4t2": {"data": 4, "tensor": 2}}
GPT2 = TransformerConfig(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=4, d_ff=64, num_layers=2, max_len=24,
                         tie_embeddings=False)
LLAMA = TransformerConfig(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, num_layers=1, max_len=24,
                          family="llama")
B, L, STEPS = 8, 12, 3
EOS, PAD = 3, 0


def mesh_of(name: str):
  """The named mesh (over all 8 devices; "one": the first device alone)."""
  return parallel.make_mesh(MESHES[name], jax.devices()[:1] if MESHES[name] is None else None)


def lm_batch(seed: int, sft: bool = False) -> dict:
  """Packed LM rows (two documents a row, some padding); `sft`: the first targets of each row masked."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 40, (B, L + 1)).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  seg[:, 7:] = 2
  for b in range(B):
    seg[b, L - b % 4:] = 0
  pos = np.where(seg == 2, np.arange(L) - 7, np.arange(L)).astype(np.int32) * (seg > 0)
  mask = (seg > 0).astype(np.float32)
  if sft:
    mask[:, :3] = 0.0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos, "segment_ids": seg, "loss_mask": mask}


def rm_batch(seed: int, K: int = 2) -> dict:
  """Comparison batch: one record of K ranked responses per element (row k = response k, slots 3..L-2-k)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 40, (B, K, L)).astype(np.int32)
  response_idx = np.zeros((B, K, L), np.int32)
  for k in range(K):  # responses of different lengths (else the token head's bias has gradient 0: Adam then
    response_idx[:, k, 3:L - 1 - k] = k + 1  # amplifies rounding noise)
  rank = np.stack([rng.permutation(K) for _ in range(B)])[:, None].astype(np.int32)
  return {"tokens": tokens, "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, K, L)).copy(),
          "segment_ids": np.ones((B, K, L), np.int32),
          "last_idx": (np.arange(K, dtype=np.int32) * L + L - 1)[None, None].repeat(B, 0),
          "rank": rank, "valid": np.ones((B, 1, K), np.int32), "response_idx": response_idx}


def opt_config():
  """AdamW at lr 1e-2 with eps 1e-6: some gradients are 0 in exact arithmetic (GPT-2's key bias: softmax ignores a
  shift shared by a row's scores), and with eps 1e-8 Adam turns their rounding noise (~1e-9, which depends on the
  summation order, i.e. on the mesh) into steps of ~lr; 1e-6 keeps those steps below the tolerance."""
  opt = optimizer.default_config(lr=1e-2)
  opt.warmup_steps, opt.eps = 1, 1e-6
  return opt


def train(mesh, loss_fn, params, specs, batches, state=None, frozen=None, frozen_specs=None):
  """`len(batches)` compiled train steps on `mesh` from `params` (or a given sharded `state`), reading a frozen
  base (LoRA) laid out by `frozen_specs` if given; (losses, state)."""
  if state is None:
    host = trainer.create_state(params, optimizer.make_optimizer(opt_config(), 10), seed=0)
    state = parallel.shard_tree(host, parallel.state_shardings(mesh, host, specs))
  sh = parallel.state_shardings(mesh, state, specs)
  frozen_sh = None if frozen is None else parallel.param_shardings(mesh, frozen, frozen_specs)
  p_train, _ = trainer.compile_steps(loss_fn, mesh, sh, frozen_sh)
  base = () if frozen is None else (parallel.shard_tree(frozen, frozen_sh),)
  out = []
  for batch in batches:
    state, sums = p_train(state, parallel.put_batch(mesh, batch), *base)
    out.append(metrics.summarize(parallel.to_host(sums))["loss"])
  return np.array(out), state


def fractions(state) -> dict:
  """Per parameter: the fraction of its elements one device holds (from addressable_shards)."""
  return {"frac/" + jax.tree_util.keystr(p): np.float64(x.addressable_shards[0].data.size / x.size)
          for p, x in jax.tree_util.tree_leaves_with_path(state.params)}


def flat(prefix: str, tree) -> dict:
  return {prefix + jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_leaves_with_path(parallel.to_host(tree))}


def supervised(mesh, out: dict):
  """Pretraining, SFT and RM: 3 steps each; losses, final params, shard fractions of the pretraining state."""
  key = jax.random.PRNGKey(0)
  gpt_axes = logical_axes(lambda: boxed_params(GPT2, key))
  losses_, state = train(mesh, functools.partial(losses.lm_loss, cfg=GPT2), init_params(GPT2, key), gpt_axes,
                         [lm_batch(i) for i in range(STEPS)])
  out.update(pretrain_loss=losses_, **flat("pretrain", state.params), **fractions(state))
  llama_axes = logical_axes(lambda: boxed_params(LLAMA, key))
  losses_, state = train(mesh, functools.partial(losses.lm_loss, cfg=LLAMA), init_params(LLAMA, key), llama_axes,
                         [lm_batch(10 + i, sft=True) for i in range(STEPS)])
  out.update(sft_loss=losses_, **flat("sft", state.params))
  rm = stages.fresh_reward_params(LLAMA, key, loglik=True, token_head=True)
  rm = dict(rm, loglik=jnp.float32(0.1), token_head=jax.tree.map(lambda x: x + 0.01, rm["head"]))
  losses_, state = train(mesh, functools.partial(losses.reward_loss, cfg=LLAMA), rm, stages.reward_axes(LLAMA, rm),
                         [rm_batch(20 + i) for i in range(STEPS)])
  out.update(reward_loss=losses_, **flat("reward", state.params))


HYPER = ppo.Hyper(kl_estimator="k3", gamma=1.0, lam=0.95, clip_eps=0.2, vf_clip=0.2, vf_coef=0.5, ptx_coef=0.5,
                  whiten_advantages=True, ppo_epochs=2, minibatches=2)
MODELS = ppo.Models(LLAMA, LLAMA, LLAMA)


def ppo_iterations(mesh, out: dict, name: str = "ppo", hyper=HYPER, models=MODELS, critic: bool = True,
                   iterations: int = STEPS):
  """PPO-ptx iterations with all four networks on `mesh` (`hyper`: GRPO/DAPO; `models.lora`: adapters on the
  frozen base, reference = the base): sampled tokens, score/update metrics, final params, under `name`."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
  policy = init_params(LLAMA, k1)
  value = stages.fresh_reward_params(LLAMA, k2, backbone=policy) if critic else None
  reward = stages.fresh_reward_params(LLAMA, k3, loglik=True)
  tx = optimizer.make_optimizer(opt_config(), 12)
  params = ppo.Trainable(policy=policy, value=value)
  if models.lora.enabled:  # nonzero B (B = 0 at init would leave A's gradient 0 in the first update)
    bump = lambda t: jax.tree.map(lambda x: x + 0.05, t)
    params = ppo.Trainable(policy=bump(lora.split(policy, models.lora, k2)[0]),
                           value=None if value is None else bump(lora.split(value, models.lora, k3, "backbone")[0]))
  host = ppo.PPOState(np.int32(0), params, tx.init(params), jax.random.PRNGKey(0))
  trained, frozen_axes = ppo.network_axes(models, reward, value, params)
  sh = parallel.state_shardings(mesh, host, trained)
  frozen = ppo.Frozen(ref=policy, reward=reward)
  frozen = parallel.shard_tree(frozen, parallel.state_shardings(mesh, frozen, frozen_axes))
  state = parallel.shard_tree(host, sh)
  sampler = sampling.make_sampler(mesh, LLAMA, max_new_tokens=6, eos_id=EOS, pad_id=PAD)
  p_score, p_update = ppo.compile_steps(mesh, sh, tx, models, hyper)
  merged = jax.jit(lambda params, frozen: ppo.effective(params, frozen, models).policy)
  rng = np.random.default_rng(5)
  G = hyper.group_size
  for it in range(1, iterations + 1):
    prompts = np.repeat(rng.integers(4, 40, (B // G, 5)).astype(np.int32), G, axis=0)
    mask = np.repeat((np.arange(5)[None] >= rng.integers(0, 4, (B // G, 1))).astype(np.int32), G, axis=0)
    policy_now = merged(state.params, frozen) if models.lora.enabled else state.params.policy
    samples = sampler(policy_now, parallel.put_batch(mesh, prompts), parallel.put_batch(mesh, mask),
                      ppo.rollout_key(0, it))
    rollout, score_sums = p_score(state.params, frozen, samples, np.float32(0.1), np.float32(0.3))
    state, update_sums = p_update(state, rollout, parallel.put_batch(mesh, lm_batch(30 + it)), np.float32(0.1),
                                  frozen if models.lora.enabled else None)
    m = ppo._host_metrics({**parallel.to_host(score_sums), **parallel.to_host(update_sums)})
    out[f"{name}_tokens_{it}"] = parallel.to_host(samples.tokens_BxT)
    out[f"{name}_logprobs_{it}"] = parallel.to_host(samples.logprobs_BxT)
    for k in ("score", "kl", "entropy", "policy_loss", "value_loss", "ptx_loss", "loss", "grad_norm",
              "explained_variance", "clipfrac_high", "loss_kl", "dropped_groups"):
      if k in m:
        out[f"{name}_{k}_{it}"] = np.float64(m[k])
  out.update(flat(name, state.params))


DAPO = ppo.Hyper(kl_estimator="k1", gamma=1.0, lam=0.95, clip_eps=0.2, vf_clip=0.2, vf_coef=0.5, ptx_coef=0.5,
                 whiten_advantages=True, ppo_epochs=2, minibatches=2, group_size=2, advantage="grpo",
                 loss_agg="dapo", clip_high=0.28, drop_equal_groups=True)
LORA = lora.Spec(rank=2, alpha=4.0, targets=("attn", "mlp"))
NEWER_MESHES = ("one", "d2f2t2")  # the newer paths on the mesh that has all three axes (compile time is the cost)


def newer_paths(mesh, out: dict):
  """GRPO+DAPO (2 iterations), DPO (3 steps), LoRA SFT (3 steps on a frozen base), LoRA PPO (2 iterations)."""
  ppo_iterations(mesh, out, "dapo", DAPO, critic=False, iterations=2)
  key = jax.random.PRNGKey(0)
  axes = logical_axes(lambda: boxed_params(LLAMA, key))
  rng = np.random.default_rng(40)
  dpo_batches = [dict(rm_batch(40 + i), ref_logp=rng.normal(-20.0, 1.0, (B, 1, 2)).astype(np.float32))
                 for i in range(STEPS)]
  loss_fn = functools.partial(losses.dpo_pair_loss, cfg=LLAMA, beta=0.1)
  losses_, state = train(mesh, loss_fn, {"policy": init_params(LLAMA, key)}, {"policy": axes}, dpo_batches)
  out.update(dpo_loss=losses_, **flat("dpo", state.params))
  base = init_params(LLAMA, key)
  adapters = lora.split(base, LORA, jax.random.PRNGKey(2))[0]
  losses_, state = train(mesh, lora.with_base(functools.partial(losses.lm_loss, cfg=LLAMA), LORA), adapters,
                         {"adapters": lora.adapter_axes(axes, adapters["adapters"], LORA)},
                         [lm_batch(50 + i, sft=True) for i in range(STEPS)], frozen=base, frozen_specs=axes)
  out.update(lora_sft_loss=losses_, **flat("lora_sft", state.params))
  ppo_iterations(mesh, out, "lora_ppo", HYPER, ppo.Models(LLAMA, LLAMA, LLAMA, LORA, "ref"), iterations=2)


def checkpoint_across_meshes(root: str):
  """Pretraining 3 steps on fsdp=8, saved; restored on data 4 × tensor 2 and trained 3 more steps (resumed.npz);
  the uninterrupted 6 steps on fsdp=8 go to f8_6.npz."""
  key = jax.random.PRNGKey(0)
  axes = logical_axes(lambda: boxed_params(GPT2, key))
  loss_fn = functools.partial(losses.lm_loss, cfg=GPT2)
  batches = [lm_batch(i) for i in range(2 * STEPS)]
  f8, d4t2 = mesh_of("f8"), mesh_of("d4t2")
  full, state6 = train(f8, loss_fn, init_params(GPT2, key), axes, batches)
  np.savez(os.path.join(root, "f8_6.npz"), loss=full, **flat("", state6))
  _, state3 = train(f8, loss_fn, init_params(GPT2, key), axes, batches[:STEPS])
  shutil.rmtree(os.path.join(root, "ckpt"), ignore_errors=True)  # (orbax skips a step that exists)
  ckpt = checkpoint.Checkpointer(os.path.join(root, "ckpt"))
  ckpt.save(STEPS, state3, {"data": {}, "meta": {}})
  ckpt.close()
  host = trainer.create_state(init_params(GPT2, key), optimizer.make_optimizer(opt_config(), 10), seed=0)
  sh = parallel.state_shardings(d4t2, host, axes)
  ckpt = checkpoint.Checkpointer(os.path.join(root, "ckpt"))
  restored, _ = ckpt.restore(STEPS, parallel.with_shardings(jax.eval_shape(lambda: host), sh))
  ckpt.close()
  layouts_ok = all(x.sharding == s for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(sh)))
  rest, state = train(d4t2, loss_fn, None, axes, batches[STEPS:], state=restored)
  np.savez(os.path.join(root, "resumed.npz"), loss=rest, layouts_ok=layouts_ok, **flat("", state))


def main(root: str):
  assert jax.device_count() == 8, jax.device_count()
  os.makedirs(root, exist_ok=True)
  for name in MESHES:
    out: dict = {}
    mesh = mesh_of(name)
    supervised(mesh, out)
    ppo_iterations(mesh, out)
    if name in NEWER_MESHES:
      newer_paths(mesh, out)
    np.savez(os.path.join(root, f"{name}.npz"), **out)
    print(name, parallel.describe_mesh(mesh), "done", flush=True)
  checkpoint_across_meshes(root)
  print("checkpoint done", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
