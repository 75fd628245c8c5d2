"""Attention kernels: the cache attention of decode, the batched and row-blocked (flash backward) CPU paths, and
jax.nn.dot_product_attention (xla / cudnn). Causal by slot index, masked to the same non-padding segment.

Dimension letters as in model.py; R rows of a batch (the row path maps over them one at a time).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

def attention_mask(q_idx_L, k_idx_S, q_seg_BxL, k_seg_BxS) -> jax.Array:
  """Boolean BxLxS mask: key slot <= query slot (causal) and same non-padding segment."""
  causal_LxS = k_idx_S[None, :] <= q_idx_L[:, None]
  same_BxLxS = (q_seg_BxL[:, :, None] == k_seg_BxS[:, None, :]) & (k_seg_BxS[:, None, :] != 0)
  return causal_LxS[None] & same_BxLxS


Q_BLOCK = 64  # query rows per block in causal_attention (a block skips the keys after its last row)
ROWS_MIN_LEN = 112  # on CPU, sequences at least this long take the row path; shorter ones one batched attention
# (fwd + bwd, B=16 H=8 E=32: batched 10.9 vs rows 14.4 ms at L=96; rows 46 vs 59 ms at L=128, B=32)


def attend_cache(q_BxLxKxGxE, kT_BxKxExS, v_BxKxSxE, mask_BxLxS) -> jax.Array:
  """softmax(q·kᵀ/√E masked)·v against the cache (stored as kᵀ and heads-major v: no per-step transpose of
  the whole cache); out_BxLxKxGxE."""
  E = q_BxLxKxGxE.shape[-1]
  q_BxKxGxLxE = jnp.transpose(q_BxLxKxGxE, (0, 2, 3, 1, 4))
  logits_BxKxGxLxS = jnp.einsum("bkgle,bkes->bkgls", q_BxKxGxLxE, kT_BxKxExS,
                                preferred_element_type=jnp.float32) / jnp.sqrt(E).astype(jnp.float32)
  logits_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxKxGxLxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxLxS = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(v_BxKxSxE.dtype)
  out_BxKxGxLxE = jnp.einsum("bkgls,bkse->bkgle", probs_BxKxGxLxS, v_BxKxSxE)
  return jnp.transpose(out_BxKxGxLxE, (0, 3, 1, 2, 4))


def batched_attention(q_BxLxKxGxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL) -> jax.Array:
  """Full-sequence causal, segment-masked attention of the whole batch at once (the accelerator path)."""
  idx_L = jnp.arange(q_BxLxKxGxE.shape[1])
  mask_BxLxS = attention_mask(idx_L, idx_L, segment_ids_BxL, segment_ids_BxL)
  return attend_cache(q_BxLxKxGxE, jnp.transpose(k_BxLxKxE, (0, 2, 3, 1)), jnp.transpose(v_BxLxKxE, (0, 2, 1, 3)),
                       mask_BxLxS)


def _query_blocks(L: int) -> list[tuple[int, int]]:
  return [(a, min(a + Q_BLOCK, L)) for a in range(0, L, Q_BLOCK)]


def _block_scores(q_RxKxGxLxE, k_RxKxSxE, seg_RxL, a: int, b: int):
  """(scaled scores, mask) of queries a..b-1 against keys 0..b-1 (the keys after a block's last row are skipped)."""
  E = q_RxKxGxLxE.shape[-1]
  mask_Rx1x1xLxS = attention_mask(jnp.arange(a, b), jnp.arange(b), seg_RxL[:, a:b], seg_RxL[:, :b])[:, None, None]
  s_RxKxGxLxS = jnp.einsum("rkgle,rkse->rkgls", q_RxKxGxLxE[:, :, :, a:b], k_RxKxSxE[:, :, :b],
                           preferred_element_type=jnp.float32) / jnp.sqrt(E).astype(jnp.float32)
  return s_RxKxGxLxS, mask_Rx1x1xLxS


def _rows_forward(q_RxKxGxLxE, k_RxKxSxE, v_RxKxSxE, seg_RxL):
  """(out, log-sum-exp of the scores) of R rows, query block by query block; a query with no key (padding)
  gets out 0."""
  outs, lses = [], []
  for a, b in _query_blocks(q_RxKxGxLxE.shape[3]):
    s_RxKxGxLxS, mask = _block_scores(q_RxKxGxLxE, k_RxKxSxE, seg_RxL, a, b)
    m_RxKxGxLx1 = jnp.max(jnp.where(mask, s_RxKxGxLxS, -jnp.inf), axis=-1, keepdims=True)
    m_RxKxGxLx1 = jnp.where(jnp.isfinite(m_RxKxGxLx1), m_RxKxGxLx1, 0.0)
    p_RxKxGxLxS = jnp.where(mask, jnp.exp(s_RxKxGxLxS - m_RxKxGxLx1), 0.0)
    l_RxKxGxLx1 = jnp.sum(p_RxKxGxLxS, axis=-1, keepdims=True)
    pv_RxKxGxLxE = jnp.einsum("rkgls,rkse->rkgle", p_RxKxGxLxS.astype(v_RxKxSxE.dtype), v_RxKxSxE[:, :, :b],
                              preferred_element_type=jnp.float32)
    outs.append(pv_RxKxGxLxE / jnp.maximum(l_RxKxGxLx1, jnp.finfo(jnp.float32).tiny))
    lses.append((m_RxKxGxLx1 + jnp.log(jnp.maximum(l_RxKxGxLx1, jnp.finfo(jnp.float32).tiny)))[..., 0])
  return jnp.concatenate(outs, axis=3).astype(v_RxKxSxE.dtype), jnp.concatenate(lses, axis=3)


def _rows_backward(q_RxKxGxLxE, k_RxKxSxE, v_RxKxSxE, seg_RxL, out_RxKxGxLxE, lse_RxKxGxL, dout_RxKxGxLxE):
  """Flash-attention backward of R rows from the saved log-sum-exp: P = exp(S − lse), dV = Pᵀ·dO,
  dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O)), dQ = dS·K/√E, dK = dSᵀ·Q/√E."""
  E = q_RxKxGxLxE.shape[-1]
  f32 = lambda x: x.astype(jnp.float32)
  q, k, v, do = f32(q_RxKxGxLxE), f32(k_RxKxSxE), f32(v_RxKxSxE), f32(dout_RxKxGxLxE)
  delta_RxKxGxL = jnp.sum(do * f32(out_RxKxGxLxE), axis=-1)
  dq_blocks, dk, dv = [], jnp.zeros_like(k), jnp.zeros_like(v)
  for a, b in _query_blocks(q.shape[3]):
    s_RxKxGxLxS, mask = _block_scores(q, k, seg_RxL, a, b)
    p_RxKxGxLxS = jnp.where(mask, jnp.exp(s_RxKxGxLxS - lse_RxKxGxL[:, :, :, a:b, None]), 0.0)
    do_b = do[:, :, :, a:b]
    dv = dv.at[:, :, :b].add(jnp.einsum("rkgls,rkgle->rkse", p_RxKxGxLxS, do_b))
    dp_RxKxGxLxS = jnp.einsum("rkgle,rkse->rkgls", do_b, v[:, :, :b])
    ds_RxKxGxLxS = p_RxKxGxLxS * (dp_RxKxGxLxS - delta_RxKxGxL[:, :, :, a:b, None]) / jnp.sqrt(E)
    dq_blocks.append(jnp.einsum("rkgls,rkse->rkgle", ds_RxKxGxLxS, k[:, :, :b]))
    dk = dk.at[:, :, :b].add(jnp.einsum("rkgls,rkgle->rkse", ds_RxKxGxLxS, q[:, :, :, a:b]))
  return (jnp.concatenate(dq_blocks, axis=3).astype(q_RxKxGxLxE.dtype), dk.astype(k_RxKxSxE.dtype),
          dv.astype(v_RxKxSxE.dtype))


def _by_row(fn, *arrays_B):
  """lax.map of fn over the batch one row at a time (each array gets a leading row axis of 1)."""
  out = jax.lax.map(lambda xs: fn(*xs), tuple(x[:, None] for x in arrays_B))
  return jax.tree.map(lambda x: x[:, 0], out)


@jax.custom_vjp
def _flash(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL):
  return _flash_fwd(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL)[0]


def _flash_fwd(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL):
  out, lse = _by_row(_rows_forward, q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL)
  return out, (q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL, out, lse)


def _flash_bwd(res, dout_BxKxGxLxE):
  dq, dk, dv = _by_row(_rows_backward, *res, dout_BxKxGxLxE)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def causal_attention(q_BxLxKxGxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL) -> jax.Array:
  """Full-sequence attention, one row at a time (lax.map) in query blocks of Q_BLOCK, with a flash-attention
  backward (custom VJP from the saved log-sum-exp, no softmax recompute): a row's scores stay in cache instead of
  B·H·L² floats going through memory, and keys after a block are skipped. Queries with no key (padding) give 0."""
  q_BxKxGxLxE = jnp.transpose(q_BxLxKxGxE, (0, 2, 3, 1, 4))
  k_BxKxLxE, v_BxKxLxE = jnp.transpose(k_BxLxKxE, (0, 2, 1, 3)), jnp.transpose(v_BxLxKxE, (0, 2, 1, 3))
  out_BxKxGxLxE = _flash(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, segment_ids_BxL.astype(jnp.int32))
  return jnp.transpose(out_BxKxGxLxE, (0, 3, 1, 2, 4))


def fused_attention(q_BxLxKxGxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL, implementation: str) -> jax.Array:
  """jax.nn.dot_product_attention (GQA: heads K·G, kv heads K), causal with the same-segment mask as a boolean
  BxHxLxL-broadcast mask. Queries with no key (padding) give an unspecified (finite) row."""
  B, L, K, G, E = q_BxLxKxGxE.shape
  seg_BxL = segment_ids_BxL
  same_Bx1xLxL = ((seg_BxL[:, :, None] == seg_BxL[:, None, :]) & (seg_BxL[:, None, :] != 0))[:, None]
  out_BxLxHxE = jax.nn.dot_product_attention(q_BxLxKxGxE.reshape(B, L, K * G, E), k_BxLxKxE, v_BxLxKxE,
                                             mask=same_Bx1xLxL, is_causal=True, implementation=implementation)
  return out_BxLxHxE.reshape(B, L, K, G, E)


def full_attention(path: str, q_BxLxKxGxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL) -> jax.Array:
  """Causal, segment-masked attention of a whole sequence by `path` (an `attention_path` result)."""
  if path == "rows":
    return causal_attention(q_BxLxKxGxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL)
  if path == "batched":
    return batched_attention(q_BxLxKxGxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL)
  return fused_attention(q_BxLxKxGxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL, path)
