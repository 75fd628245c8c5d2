"""Attention kernels and the model's attention paths: rows (flash backward), batched, jax.nn.dot_product_attention
(xla) agree on a packed, padded batch (outputs and gradients at real queries); cudnn off-GPU is a clear error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import attention as A
from rlhf_jax import model as M


def _qkv_seg(L):
  B, K, G, E = 2, 2, 2, 8
  keys = jax.random.split(jax.random.PRNGKey(11), 3)
  q = jax.random.normal(keys[0], (B, L, K, G, E))
  k = jax.random.normal(keys[1], (B, L, K, E))
  v = jax.random.normal(keys[2], (B, L, K, E))
  seg = np.ones((B, L), np.int32)
  seg[0, L // 2:] = 2  # two packed documents
  seg[1, L - 10:] = 0  # padding
  return q, k, v, seg


def _masked_grads(fn, q, k, v, seg):
  """Gradients wrt (q, k, v) of sum(out² at real queries), jitted."""
  real_BxLx1x1x1 = jnp.asarray(seg > 0)[:, :, None, None, None]
  loss = lambda q, k, v: jnp.sum(jnp.where(real_BxLx1x1x1, fn(q, k, v, jnp.asarray(seg)), 0.0) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


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
  rows = jax.jit(A.causal_attention)(q, k, v, jnp.asarray(seg))
  batched = jax.jit(A.batched_attention)(q, k, v, jnp.asarray(seg))
  real = seg > 0
  np.testing.assert_allclose(np.asarray(rows)[real], np.asarray(batched)[real], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(rows)[~real], 0.0)  # a query with no key gives 0 (and no gradient)
  # the CPU path's custom VJP (flash backward from the saved log-sum-exp) against autodiff of the batched path
  grads = lambda f: _masked_grads(f, q, k, v, seg)
  for got, want in zip(grads(A.causal_attention), grads(A.batched_attention)):
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_xla_kernel_equals_batched_with_gqa_on_real_queries():
  """jax.nn.dot_product_attention (xla) equals the batched kernel at real queries (GQA K=2, G=2), outputs and
  gradients (the row kernel: the test above)."""
  fn = lambda *a: A.fused_attention(*a, implementation="xla")
  q, k, v, seg = _qkv_seg(40)
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, k, v, jnp.asarray(seg)))[seg > 0],
                             np.asarray(jax.jit(A.batched_attention)(q, k, v, jnp.asarray(seg)))[seg > 0], atol=1e-5)
  grads = lambda f: _masked_grads(f, q, k, v, seg)
  for got, want in zip(grads(fn), grads(A.batched_attention)):
    np.testing.assert_allclose(got, want, atol=1e-4)


def _cfg(**kw):
  return M.TransformerConfig(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, num_layers=2,
                             max_len=128, family="llama", tie_embeddings=False, **kw)


def _loss_and_grads(cfg, params, L):
  """Masked log-softmax² loss, its logits and gradients on a packed (two documents), padded batch of length L."""
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, L))
  seg = np.ones((2, L), np.int32)
  seg[0, 60:] = 2
  seg[1, L - 10:] = 0
  pos = np.concatenate([np.arange(60), np.arange(L - 60)])[None].repeat(2, 0)
  real = jnp.asarray(seg > 0)

  def loss(p):
    logits, _ = M.Transformer(cfg).apply({"params": p}, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
    return jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0.0) ** 2), logits

  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, np.asarray(logits)[seg > 0], grads


@pytest.mark.parametrize("path", ["rows", "xla"])
def test_model_attention_paths_equal_the_batched_path(path):
  """At L >= ROWS_MIN_LEN (where auto takes the CPU row path) every CPU-available `attention` setting gives the
  batched path's logits and parameter gradients on a packed, padded batch."""
  L = M.ROWS_MIN_LEN + 4
  assert M.attention_path(_cfg(), L) == "rows" and M.attention_path(_cfg(attention=path), L) == path
  params = M.init_params(_cfg(), jax.random.PRNGKey(5))
  want_loss, want_logits, want_grads = _loss_and_grads(_cfg(attention="batched"), params, L)
  got_loss, got_logits, got_grads = _loss_and_grads(_cfg(attention=path), params, L)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_auto_uses_batched_below_rows_min_len_and_bad_settings_raise():
  assert M.attention_path(_cfg(), M.ROWS_MIN_LEN - 1) == "batched"
  with pytest.raises(ValueError, match="attention='flash'"):
    _cfg(attention="flash")
  with pytest.raises(ValueError, match="attention='cudnn' needs a GPU; this backend is 'cpu'"):
    M.init_params(_cfg(attention="cudnn"), jax.random.PRNGKey(0))
