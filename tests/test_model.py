"""Transformer: shapes, causality, packing, GQA, KV-cache decode == full forward, config errors."""
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


def _apply(cfg, params, tokens, **kw):
  return M.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), **kw)


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
  cache = M.init_cache(cfg, B, P + T)
  logits, state = model.apply({"params": params, "cache": cache}, tokens[:, :P], pos[:, :P], segs[:, :P],
                              decode=True, mutable=["cache"])
  steps = [logits[0]]
  for t in range(P, P + T):
    logits, state = model.apply({"params": params, "cache": state["cache"]}, tokens[:, t:t + 1], pos[:, t:t + 1],
                                segs[:, t:t + 1], decode=True, mutable=["cache"])
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
  params = head.init(jax.random.PRNGKey(0), h)["params"]
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


def test_row_blocked_attention_equals_batched_attention():
  """The CPU path (row by row, query blocks of Q_BLOCK) equals the accelerator path on real (non-pad) queries."""
  B, L, K, G, E = 2, 150, 2, 2, 8  # L > 2 * Q_BLOCK: three query blocks
  keys = jax.random.split(jax.random.PRNGKey(11), 3)
  q = jax.random.normal(keys[0], (B, L, K, G, E))
  k = jax.random.normal(keys[1], (B, L, K, E))
  v = jax.random.normal(keys[2], (B, L, K, E))
  seg = np.ones((B, L), np.int32)
  seg[0, 70:] = 2  # two packed documents
  seg[1, 140:] = 0  # padding
  rows = M.causal_attention(q, k, v, jnp.asarray(seg))
  batched = M.batched_attention(q, k, v, jnp.asarray(seg))
  real = seg > 0
  np.testing.assert_allclose(np.asarray(rows)[real], np.asarray(batched)[real], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(rows)[~real], 0.0)  # a query with no key gives 0 (and no gradient)
  # the CPU path's custom VJP (flash backward from the saved log-sum-exp) against autodiff of the batched path
  grads = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, jnp.asarray(seg))[jnp.asarray(real)] ** 2),
                             argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads(M.causal_attention), grads(M.batched_attention)):
    np.testing.assert_allclose(got, want, atol=1e-4)


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


def test_cpu_row_path_equals_batched_path_in_the_model(monkeypatch):
  """At L >= ROWS_MIN_LEN the CPU model takes the row path (flash backward); logits and parameter gradients
  equal those of the batched path (forced by raising ROWS_MIN_LEN) on a packed, padded batch."""
  cfg = _cfg("llama", max_len=128)
  params = M.init_params(cfg, jax.random.PRNGKey(5))
  L = M.ROWS_MIN_LEN + 4
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, L))
  seg = np.ones((2, L), np.int32)
  seg[0, 60:] = 2
  seg[1, L - 10:] = 0
  pos = np.concatenate([np.arange(60), np.arange(L - 60)])[None].repeat(2, 0)
  real = jnp.asarray(seg > 0)

  def loss(p):
    logits, _ = M.Transformer(cfg).apply({"params": p}, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
    return jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0.0) ** 2), logits

  (rows_loss, rows_logits), rows_grads = jax.value_and_grad(loss, has_aux=True)(params)
  monkeypatch.setattr(M, "ROWS_MIN_LEN", 10 ** 6)
  (batched_loss, batched_logits), batched_grads = jax.value_and_grad(loss, has_aux=True)(params)
  np.testing.assert_allclose(np.asarray(rows_logits)[seg > 0], np.asarray(batched_logits)[seg > 0], atol=1e-5)
  np.testing.assert_allclose(rows_loss, batched_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(rows_grads), jax.tree.leaves(batched_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
