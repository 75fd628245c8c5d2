"""Transformer: shapes, causality, packing, GQA, KV-cache decode == full forward, config errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import model as M


def _cfg(family, **kw):
  base = dict(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=4 if family == "gpt2" else 2, d_ff=48,
              num_layers=2, max_len=24, family=family, tie_embeddings=family == "gpt2")
  base.update(kw)
  return M.TransformerConfig(**base)


FAMILIES = ["gpt2", "llama"]


@functools.partial(jax.jit, static_argnames=("cfg", "logits_slots"))
def _forward(params, tokens, positions_BxL, segment_ids_BxL, *, cfg, logits_slots):
  kw = {k: v for k, v in dict(positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL,
                              logits_slots=logits_slots).items() if v is not None}
  return M.Transformer(cfg).apply({"params": params}, tokens, **kw)


def _apply(cfg, params, tokens, positions_BxL=None, segment_ids_BxL=None, logits_slots=None):
  """The model's forward, jitted (one compilation per config and shape instead of op-by-op dispatch)."""
  return _forward(params, jnp.asarray(tokens), positions_BxL, segment_ids_BxL, cfg=cfg, logits_slots=logits_slots)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_and_param_tree(family):
  cfg = _cfg(family)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  logits, h = _apply(cfg, params, np.zeros((3, 7), np.int32))
  assert logits.shape == (3, 7, 40) and logits.dtype == jnp.float32
  assert h.shape == (3, 7, 32)
  assert ("pos_embed" in params) == (family == "gpt2")
  assert ("lm_head" in params) == (family == "llama")
  assert params["layer_0"]["attn"]["k"]["kernel"].shape == (32, cfg.num_kv_heads, 8)
  assert ("bias" in params["layer_0"]["mlp"][("fc_in" if family == "gpt2" else "gate")]) == (family == "gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_causality(family):
  """Changing token t never changes logits at positions < t, and does change position t."""
  cfg = _cfg(family)
  params = M.init_params(cfg, jax.random.PRNGKey(1))
  tokens = np.array(jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, 40))
  base, _ = _apply(cfg, params, tokens)
  for t in (0, 5, 11):
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 7) % 40
    out, _ = _apply(cfg, params, changed)
    np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
    assert np.abs(np.asarray(out[:, t]) - np.asarray(base[:, t])).max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_segments_match_separate_documents(family):
  """Two documents packed in one row with restarted positions give each document's own logits."""
  cfg = _cfg(family)
  params = M.init_params(cfg, jax.random.PRNGKey(3))
  doc_a = np.array([[5, 9, 3, 7, 2]])
  doc_b = np.array([[11, 4, 8]])
  packed = np.concatenate([doc_a, doc_b, [[0, 0]]], axis=1)
  segs = np.array([[1] * 5 + [2] * 3 + [0] * 2])
  pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]])
  out, _ = _apply(cfg, params, packed, positions_BxL=jnp.asarray(pos), segment_ids_BxL=jnp.asarray(segs))
  alone_a, _ = _apply(cfg, params, doc_a)
  alone_b, _ = _apply(cfg, params, doc_b)
  np.testing.assert_allclose(out[:, :5], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[:, 5:8], alone_b, atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()  # padding rows do not produce NaN


def test_gqa_equals_mha_with_repeated_kv_heads():
  """K < H: grouped-query attention equals multi-head attention whose kv heads are repeated per group."""
  gqa = _cfg("llama", num_kv_heads=2)
  mha = _cfg("llama", num_kv_heads=4)
  params = M.init_params(gqa, jax.random.PRNGKey(4))
  mha_params = jax.tree.map(lambda x: x, params)
  for i in range(gqa.num_layers):
    attn = dict(mha_params[f"layer_{i}"]["attn"])
    for name in ("k", "v"):
      attn[name] = {"kernel": jnp.repeat(params[f"layer_{i}"]["attn"][name]["kernel"], 2, axis=1)}
    mha_params[f"layer_{i}"] = dict(mha_params[f"layer_{i}"], attn=attn)
  tokens = np.array(jax.random.randint(jax.random.PRNGKey(5), (2, 9), 0, 40))
  out_gqa, _ = _apply(gqa, params, tokens)
  out_mha, _ = _apply(mha, mha_params, tokens)
  np.testing.assert_allclose(out_gqa, out_mha, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_path_equals_full_forward(family):
  """Prefill of a left-padded prompt, then one token per step, reproduces the full forward's logits."""
  cfg = _cfg(family)
  params = M.init_params(cfg, jax.random.PRNGKey(6))
  B, P, T = 2, 6, 5
  tokens = np.array(jax.random.randint(jax.random.PRNGKey(7), (B, P + T), 1, 40))
  segs = np.ones((B, P + T), np.int32)
  segs[1, :2] = 0  # row 1 is left-padded by two slots
  pos = np.maximum(np.cumsum(segs, axis=1) - 1, 0)
  full, _ = _apply(cfg, params, tokens, positions_BxL=jnp.asarray(pos), segment_ids_BxL=jnp.asarray(segs))
  model = M.Transformer(cfg)
  step = jax.jit(lambda params, cache, t, p, s: model.apply({"params": params, "cache": cache}, t, p, s, decode=True,
                                                            mutable=["cache"]))  # compiled once per length
  logits, state = step(params, M.init_cache(cfg, B, P + T), tokens[:, :P], pos[:, :P], segs[:, :P])
  steps = [logits[0]]
  for t in range(P, P + T):
    logits, state = step(params, state["cache"], tokens[:, t:t + 1], pos[:, t:t + 1], segs[:, t:t + 1])
    steps.append(logits[0])
  decoded = np.concatenate([np.asarray(s) for s in steps], axis=1)
  valid = segs.astype(bool)
  np.testing.assert_allclose(decoded[valid], np.asarray(full)[valid], atol=1e-5)


def test_bfloat16_compute_runs_and_stays_close():
  cfg32 = _cfg("llama")
  cfg16 = _cfg("llama", dtype="bfloat16")
  params = M.init_params(cfg32, jax.random.PRNGKey(8))
  tokens = np.array(jax.random.randint(jax.random.PRNGKey(9), (2, 8), 0, 40))
  out32, _ = _apply(cfg32, params, tokens)
  out16, h16 = _apply(cfg16, params, tokens)
  assert out16.dtype == jnp.float32 and h16.dtype == jnp.bfloat16
  assert np.abs(np.asarray(out16) - np.asarray(out32)).max() < 0.1


def test_scalar_head():
  cfg = _cfg("gpt2")
  head = M.ScalarHead(cfg)
  h = jnp.ones((2, 5, 32))
  params = nn.unbox(head.init(jax.random.PRNGKey(0), h)["params"])  # boxed with logical axis names
  out = head.apply({"params": params}, h)
  assert out.shape == (2, 5)
  expected = np.ones((2, 5, 32)) @ np.asarray(params["dense"]["kernel"])[:, 0] + np.asarray(params["dense"]["bias"])[0]
  np.testing.assert_allclose(out, expected, rtol=1e-5)


@pytest.mark.parametrize("kw,field", [
    (dict(family="bert"), "family"),
    (dict(d_model=30), "d_model"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(dtype="float8"), "dtype"),
])
def test_bad_config_names_the_field(kw, field):
  with pytest.raises(ValueError, match=field):
    _cfg(**{"family": "llama", **kw})


def test_too_long_sequence_and_unknown_field():
  cfg = _cfg("gpt2")
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="max_len=24"):
    _apply(cfg, params, np.zeros((1, 25), np.int32))
  with pytest.raises(ValueError, match="max_len=24"):
    M.init_cache(cfg, 1, 30)
  with pytest.raises(ValueError, match="n_embd"):
    M.TransformerConfig.from_dict(dict(vocab_size=4, n_embd=3))


@pytest.mark.parametrize("family", FAMILIES)  # gpt2: tied head; llama: untied lm_head
def test_logits_slots_equal_the_full_logits_sliced(family):
  cfg = _cfg(family)
  params = M.init_params(cfg, jax.random.PRNGKey(4))
  tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 9))
  logits, h = _apply(cfg, params, tokens)
  part, h_part = _apply(cfg, params, tokens, logits_slots=(3, 8))
  assert part.shape == (2, 5, cfg.vocab_size) and part.dtype == jnp.float32
  np.testing.assert_allclose(part, logits[:, 3:8], atol=1e-6)
  np.testing.assert_array_equal(h_part, h)


def _packed_batch(cfg, L=12, seed=0):
  """tokens, positions, segment ids of a packed (row 0: two documents), padded (row 1: 3 pad slots) batch."""
  tokens = np.random.default_rng(seed).integers(1, cfg.vocab_size, (2, L))
  seg = np.ones((2, L), np.int32)
  seg[0, L // 2:] = 2
  seg[1, L - 3:] = 0
  pos = np.concatenate([np.arange(L // 2), np.arange(L - L // 2)])[None].repeat(2, 0)
  return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


def _loss_grads(cfg, params, batch):
  """(logits, gradients) of a masked log-softmax² loss, jitted (the model's whole forward and backward)."""
  tokens, pos, seg = batch
  real_BxLx1 = (seg > 0)[..., None]

  def loss(p):
    logits, h = M.Transformer(cfg).apply({"params": p}, tokens, pos, seg)
    return jnp.sum(jnp.where(real_BxLx1, jax.nn.log_softmax(logits), 0.0) ** 2) + jnp.sum(h ** 2), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(logits), grads


def test_stack_and_unstack_layers_are_inverse_tree_conversions():
  cfg = _cfg("llama", num_layers=3)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  stacked = M.stack_layers({"backbone": params, "head": {"w": np.ones(2)}})  # nested trees too (a reward model)
  assert sorted(stacked["backbone"]) == ["embed", "final_norm", "layers", "lm_head"]
  assert stacked["backbone"]["layers"]["attn"]["q"]["kernel"].shape == (3, 32, 4, 8)
  back = M.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure({"backbone": params, "head": {"w": np.ones(2)}})
  for got, want in zip(jax.tree.leaves(back["backbone"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)
  assert M.stack_layers(stacked) == stacked and M.to_layout(stacked, cfg)["backbone"].keys() == params.keys()
  with pytest.raises(ValueError, match="layer_0 .. layer_1"):
    M.stack_layers({"layer_0": {}, "layer_2": {}})


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_layers_equal_the_unrolled_model(family):
  """scan_layers=True with the unrolled params stacked: the scanned init has the stacked tree's structure, and
  logits, hidden state, logits_slots and gradients (unstacked back) equal the unrolled model's on a packed,
  padded batch."""
  cfg, scfg = _cfg(family, num_layers=3), _cfg(family, num_layers=3, scan_layers=True)
  params = M.init_params(cfg, jax.random.PRNGKey(1))
  stacked = M.stack_layers(params)
  assert jax.tree.structure(M.init_params(scfg, jax.random.PRNGKey(1))) == jax.tree.structure(stacked)
  batch = _packed_batch(cfg)
  logits, grads = _loss_grads(cfg, params, batch)
  s_logits, s_grads = _loss_grads(scfg, stacked, batch)
  np.testing.assert_allclose(s_logits, logits, atol=1e-5)
  for got, want in zip(jax.tree.leaves(M.unstack_layers(s_grads)), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  part, _ = _apply(scfg, stacked, batch[0], positions_BxL=batch[1], segment_ids_BxL=batch[2], logits_slots=(2, 7))
  np.testing.assert_allclose(part, logits[:, 2:7], atol=1e-5)


def test_scan_layers_decode_and_the_sampler_equal_the_unrolled_model():
  """The scanned model's cache (stacked per layer) gives the unrolled decode's logits, and sampling.sample (its
  code unchanged) draws the same tokens and log-probs from the same key."""
  from rlhf_jax import sampling
  cfg, scfg = _cfg("llama", num_layers=3), _cfg("llama", num_layers=3, scan_layers=True)
  params = M.init_params(cfg, jax.random.PRNGKey(2))
  stacked = M.stack_layers(params)
  cache = M.init_cache(scfg, 2, 10)
  assert cache["layers"]["attn"]["key"].shape[0] == 3
  tokens, pos, seg = _packed_batch(cfg, L=6)
  pos, seg = jnp.broadcast_to(jnp.arange(6), (2, 6)), jnp.ones((2, 6), jnp.int32).at[1, :2].set(0)
  outs = [M.Transformer(c).apply({"params": p, "cache": M.init_cache(c, 2, 10)}, tokens, pos, seg, decode=True,
                                 mutable=["cache"])[0][0] for c, p in ((cfg, params), (scfg, stacked))]
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
  prompts, mask = np.array(tokens), np.array(seg)
  got = [sampling.sample(p, c, prompts, mask, jax.random.PRNGKey(3), max_new_tokens=4, eos_id=1, pad_id=0)
         for c, p in ((cfg, params), (scfg, stacked))]
  np.testing.assert_array_equal(got[1].tokens_BxT, got[0].tokens_BxT)
  np.testing.assert_allclose(got[1].logprobs_BxT, got[0].logprobs_BxT, atol=1e-5)


@pytest.mark.parametrize("remat,scan", [("block", False), ("dots", True)])
def test_remat_keeps_logits_and_gradients(remat, scan):
  cfg = _cfg("gpt2", num_layers=2)
  params = M.init_params(cfg, jax.random.PRNGKey(3))
  batch = _packed_batch(cfg)
  logits, grads = _loss_grads(cfg, params, batch)
  rcfg = _cfg("gpt2", num_layers=2, remat=remat, scan_layers=scan)
  r_logits, r_grads = _loss_grads(rcfg, M.to_layout(params, rcfg), batch)
  np.testing.assert_allclose(r_logits, logits, atol=1e-5)
  for got, want in zip(jax.tree.leaves(M.unstack_layers(r_grads)), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="remat='all'"):
    _cfg("gpt2", remat="all")


def test_bfloat16_training_steps_are_finite_and_lower_the_loss():
  """bf16 compute and bf16 params (scanned, remat): a finite loss that jitted adamw steps lower (params stay
  bf16); weight decay skips the stacked norm scales (rank 2 only because of the layers axis)."""
  from rlhf_jax import losses, optimizer
  cfg = _cfg("llama", dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, remat="block")
  params = M.init_params(cfg, jax.random.PRNGKey(4))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  tokens, pos, seg = _packed_batch(cfg, L=12)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=pos[:, :-1], segment_ids=seg[:, :-1],
               loss_mask=(seg[:, 1:] > 0).astype(jnp.int32))
  opt = optimizer.default_config(lr=1e-2)
  opt.warmup_steps = 0
  tx = optimizer.make_optimizer(opt, 10)
  mask = jax.tree.leaves(optimizer._decay_mask(params))
  assert sum(mask) == 9 and len(mask) == 12  # embed, lm_head, 7 stacked kernels; not the 3 norm scales

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: losses.lm_loss(p, batch, None, cfg=cfg)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return loss, jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates), opt_state

  opt_state, losses_seen = tx.init(params), []
  for _ in range(4):
    loss, params, opt_state = step(params, opt_state)
    losses_seen.append(float(loss))
  assert np.all(np.isfinite(losses_seen)) and losses_seen[-1] < losses_seen[0], losses_seen
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
