"""Decoder-only Transformer (GPT-2 and LLaMA-like families: LLaMA, Mistral, Qwen2, Qwen3) with a KV-cache decode path.

Dimension letters used in names throughout the package:
  B batch, L sequence (query) length, S key length (cache slots), T response/rollout length,
  P prompt length, V vocab, D model width, H query heads, K key/value heads (K divides H),
  G query heads per kv head (H // K), E head dim (D // H unless explicit_head_dim), F MLP hidden width.

`Transformer(cfg).apply({"params": p}, tokens_BxL)` returns `(logits_BxLxV, h_BxLxD)` where `h` is the
final-normed hidden state (what `ScalarHead` reads for reward and value). Packed sequences pass
`segment_ids_BxL` (0 = padding, documents numbered from 1) and `positions_BxL`; attention is causal by
slot index and never crosses a segment. Decode mode (`decode=True`, `mutable=["cache"]`) writes keys,
values and segment ids into a cache of S slots and attends over it, so prefill + one-token steps give
the full forward's logits.

Large-model options (TransformerConfig): `scan_layers` runs the blocks as one nn.scan (params and cache stacked
under "layers" with a leading num_layers axis; `stack_layers` / `unstack_layers` / `to_layout` convert trees
between the two layouts), `remat` recomputes each block in the backward (REMAT_POLICIES), `attention` picks the
full-sequence attention implementation (ATTENTION; kernels in attention.py).

LLaMA-like families ("llama", "mistral", "qwen2", "qwen3") share one block (RMSNorm, RoPE, SwiGLU, GQA); the name
picks the Hugging Face architecture hf_import writes. What differs is in fields: `qkv_bias` (Qwen2), `qk_norm`
(Qwen3: RMSNorm over each q and k head before RoPE, so the cache holds normed keys), `explicit_head_dim`
(E != D // H), `rope_scaling` (linear or llama3 frequencies, rope.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import attention as kernels
from rlhf_jax import lora, parallel
from rlhf_jax.rope import ROPE_SCALINGS, inv_frequencies, rope  # noqa: F401 (re-exported: model.rope)
from rlhf_jax.attention import (  # noqa: F401 (re-exported: model.causal_attention etc.)
    Q_BLOCK, ROWS_MIN_LEN, attend_cache, attention_mask, batched_attention, causal_attention, full_attention,
    fused_attention)

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")  # all but gpt2: the LLaMA block
# Backward recompute per block: "block" keeps only the block's input, "dots" also every matmul output without a
# batch dimension (the projections; attention scores and the elementwise ops are recomputed).
REMAT_POLICIES = {"none": None, "block": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# Full-sequence attention: "auto" = on CPU the row path from ROWS_MIN_LEN on, else batched; on accelerators
# jax.nn.dot_product_attention (cudnn where dtype and head_dim allow, else xla). "xla" / "cudnn" force that
# implementation of jax.nn.dot_product_attention (cudnn: GPU only), "rows" / "batched" force our CPU paths.
ATTENTION = ("auto", "xla", "cudnn", "rows", "batched")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of one decoder-only model; the model never sees a ConfigDict."""
  vocab_size: int  # V
  d_model: int  # D
  num_heads: int  # H
  num_kv_heads: int  # K (== H for multi-head attention, < H for grouped-query attention)
  d_ff: int  # F
  num_layers: int  # number of Transformer blocks
  max_len: int  # longest sequence (positions table / RoPE range)
  family: str = "gpt2"  # "gpt2": LayerNorm, learned positions, GELU-tanh, biases; others: RMSNorm, RoPE, SwiGLU
  tie_embeddings: bool = True  # output projection shares the token embedding
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0  # llama only
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"  # parameter storage dtype
  scan_layers: bool = False  # blocks as one nn.scan: params stacked under "layers" (leading axis num_layers)
  remat: str = "none"  # backward recompute of each block: none | block (save nothing) | dots (save matmuls)
  attention: str = "auto"  # full-sequence attention: auto | xla | cudnn | rows | batched (see ATTENTION)
  # LLaMA-like families only (the defaults leave a model unchanged):
  qkv_bias: bool = False  # biases on q, k, v (Qwen2); o has none
  qk_norm: bool = False  # RMSNorm (eps norm_eps) over each q and k head before RoPE (Qwen3)
  explicit_head_dim: int | None = None  # E when it is not D // H (Qwen3, Mistral-Nemo); None: D // H
  rope_scaling: str = "none"  # none | linear | llama3 (ROPE_SCALINGS; equations in rope.py)
  rope_factor: float = 1.0  # linear and llama3: how much longer the context is than the original
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_original_max_len: int = 8192  # llama3: original_max_position_embeddings

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"TransformerConfig.family={self.family!r}; expected one of {FAMILIES}")
    for field in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "d_ff", "num_layers", "max_len"):
      if getattr(self, field) <= 0:
        raise ValueError(f"TransformerConfig.{field}={getattr(self, field)} must be positive")
    if self.explicit_head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"TransformerConfig.d_model={self.d_model} not divisible by num_heads={self.num_heads}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"TransformerConfig.num_heads={self.num_heads} not divisible by "
                       f"num_kv_heads={self.num_kv_heads}")
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in _DTYPES:
        raise ValueError(f"TransformerConfig.{field}={getattr(self, field)!r}; expected one of {list(_DTYPES)}")
    for field, allowed in (("remat", tuple(REMAT_POLICIES)), ("attention", ATTENTION),
                           ("rope_scaling", ROPE_SCALINGS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"TransformerConfig.{field}={getattr(self, field)!r}; expected one of {allowed}")
    self._check_llama_like()

  def _check_llama_like(self):
    """The LLaMA-like fields: off for gpt2, consistent otherwise."""
    changed = {f: getattr(self, f) for f, off in (("qkv_bias", False), ("qk_norm", False),
                                                   ("explicit_head_dim", None), ("rope_scaling", "none"))
               if getattr(self, f) != off}
    if self.family == "gpt2" and changed:
      raise ValueError(f"TransformerConfig {changed} needs a LLaMA-like family {FAMILIES[1:]}; family='gpt2'")
    if self.explicit_head_dim is not None and self.explicit_head_dim <= 0:
      raise ValueError(f"TransformerConfig.explicit_head_dim={self.explicit_head_dim} must be positive or None")
    if self.family != "gpt2" and self.head_dim % 2:
      raise ValueError(f"TransformerConfig head_dim={self.head_dim} must be even for RoPE")
    if self.rope_scaling != "none" and self.rope_factor <= 0:
      raise ValueError(f"TransformerConfig.rope_factor={self.rope_factor} must be positive")
    if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
      raise ValueError(f"TransformerConfig.rope_low_freq_factor={self.rope_low_freq_factor} must be positive and "
                       f"below rope_high_freq_factor={self.rope_high_freq_factor}")

  @property
  def head_dim(self) -> int:
    return self.explicit_head_dim or self.d_model // self.num_heads

  @property
  def use_bias(self) -> bool:
    return self.family == "gpt2"

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return _DTYPES[self.param_dtype]

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TransformerConfig":
    """Builds a config from a mapping (e.g. a ConfigDict's `to_dict()`), rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown model config fields {unknown}; known: {sorted(names)}")
    return cls(**d)


# Logical axis names of parameter dimensions (parallel.RULES maps them to mesh axes):
#   "vocab" V, "embed" D, "heads" H, "kv_heads" K, "head_dim" E (also qk_norm's scales), "mlp" F, "positions" the
#   learned position table's rows, "norm" the D of norm scales/biases, "scalar" the single output of a ScalarHead.
_named = nn.with_logical_partitioning
# Logical names of activation dimensions (parallel.ACTIVATION_RULES; distinct from the parameters' so that FSDP
# gathers weights and keeps activations split over the batch). `_constrain` is a no-op outside parallel.jit.
_BLD = ("activation_batch", "activation_length", "activation_embed")
_BLHE = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_BLKE = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
_BLF = ("activation_batch", "activation_length", "activation_mlp")
_BLV = ("activation_batch", "activation_length", "activation_vocab")
_constrain = parallel.constrain


def _dense(cfg: TransformerConfig, features, name: str, in_axes: tuple, out_axes: tuple, axis=-1,
           use_bias=None):
  """DenseGeneral whose kernel is named in_axes + out_axes and bias out_axes (logical names, see above), as a
  function of x; with LoRA leaves beside its kernel (lora.attach) it adds the unmerged adapter path (lora.adapt)."""
  dense = nn.DenseGeneral(
      features, axis=axis, use_bias=cfg.use_bias if use_bias is None else use_bias, dtype=cfg.jnp_dtype,
      param_dtype=cfg.jnp_param_dtype, kernel_init=_named(nn.initializers.normal(0.02), in_axes + out_axes),
      bias_init=_named(nn.initializers.zeros_init(), out_axes), name=name)
  return lambda x: lora.adapt(dense(x), x, dense.variables.get("params", {}), len(in_axes), cfg.jnp_dtype)


def _norm(cfg: TransformerConfig, name: str) -> nn.Module:
  kw = dict(epsilon=cfg.norm_eps, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
            scale_init=_named(nn.initializers.ones_init(), ("norm",)), name=name)
  if cfg.family != "gpt2":
    return nn.RMSNorm(**kw)
  return nn.LayerNorm(bias_init=_named(nn.initializers.zeros_init(), ("norm",)), **kw)


def _head_norm(cfg: TransformerConfig, name: str) -> nn.Module:
  """RMSNorm over the E of every head (qk_norm), its scale named ("head_dim",)."""
  return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                    scale_init=_named(nn.initializers.ones_init(), ("head_dim",)), name=name)


def rope_frequencies(cfg: TransformerConfig) -> jax.Array:
  """The E2 RoPE frequencies of cfg (rope_theta, rope_scaling and its factors)."""
  return inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor,
                         cfg.rope_high_freq_factor, cfg.rope_original_max_len)


def attention_path(cfg: TransformerConfig, L: int) -> str:
  """The full-sequence attention path `cfg.attention` selects at length L on this backend (see ATTENTION)."""
  backend = jax.default_backend()
  if cfg.attention == "cudnn" and backend != "gpu":
    raise ValueError(f"TransformerConfig.attention='cudnn' needs a GPU; this backend is {backend!r} "
                     f"(use 'xla', 'batched' or 'auto')")
  if cfg.attention != "auto":
    return cfg.attention
  if backend == "cpu":  # row blocks keep the scores in cache from ROWS_MIN_LEN on (BENCHMARKS.md)
    return "rows" if L >= kernels.ROWS_MIN_LEN else "batched"
  cudnn_ok = cfg.dtype in ("bfloat16", "float16") and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128
  return "cudnn" if backend == "gpu" and cudnn_ok else "xla"


class Attention(nn.Module):
  """Multi-head / grouped-query causal self-attention with an optional KV cache."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, decode: bool):
    cfg = self.cfg
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bias = cfg.use_bias or cfg.qkv_bias
    q_BxLxHxE = _dense(cfg, (H, E), "q", ("embed",), ("heads", "head_dim"), use_bias=bias)(x_BxLxD)
    k_BxLxKxE = _dense(cfg, (K, E), "k", ("embed",), ("kv_heads", "head_dim"), use_bias=bias)(x_BxLxD)
    v_BxLxKxE = _dense(cfg, (K, E), "v", ("embed",), ("kv_heads", "head_dim"), use_bias=bias)(x_BxLxD)
    q_BxLxHxE, k_BxLxKxE, v_BxLxKxE = (_constrain(q_BxLxHxE, _BLHE), _constrain(k_BxLxKxE, _BLKE),
                                       _constrain(v_BxLxKxE, _BLKE))
    if cfg.qk_norm:
      q_BxLxHxE = _head_norm(cfg, "q_norm")(q_BxLxHxE)
      k_BxLxKxE = _head_norm(cfg, "k_norm")(k_BxLxKxE)
    if cfg.family != "gpt2":
      inv_freq_E2 = rope_frequencies(cfg)
      q_BxLxHxE = rope(q_BxLxHxE, positions_BxL, cfg.rope_theta, inv_freq_E2)
      k_BxLxKxE = rope(k_BxLxKxE, positions_BxL, cfg.rope_theta, inv_freq_E2)
    B, L = x_BxLxD.shape[:2]
    q_idx_L = jnp.arange(L)
    q_BxLxKxGxE = q_BxLxHxE.reshape(B, L, K, H // K, E)
    if decode:
      kT_BxKxExS, v_BxKxSxE, k_seg_BxS, q_idx_L = self._update_cache(k_BxLxKxE, v_BxLxKxE, segment_ids_BxL)
      mask_BxLxS = attention_mask(q_idx_L, jnp.arange(k_seg_BxS.shape[1]), segment_ids_BxL, k_seg_BxS)
      out_BxLxKxGxE = attend_cache(q_BxLxKxGxE, kT_BxKxExS, v_BxKxSxE, mask_BxLxS)
    else:
      out_BxLxKxGxE = full_attention(attention_path(cfg, L), q_BxLxKxGxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL)
    return _dense(cfg, cfg.d_model, "o", ("heads", "head_dim"), ("embed",), axis=(-2, -1))(
        out_BxLxKxGxE.reshape(B, L, H, E))

  def _update_cache(self, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL):
    """Writes L new slots at the cache index; returns the whole cache and the new slots' indices."""
    initialized = self.has_variable("cache", "key")
    kT_BxKxExL = jnp.transpose(k_BxLxKxE, (0, 2, 3, 1))
    v_BxKxLxE = jnp.transpose(v_BxLxKxE, (0, 2, 1, 3))
    key = self.variable("cache", "key", jnp.zeros, kT_BxKxExL.shape, k_BxLxKxE.dtype)
    value = self.variable("cache", "value", jnp.zeros, v_BxKxLxE.shape, v_BxLxKxE.dtype)
    seg = self.variable("cache", "segment_ids", jnp.zeros, segment_ids_BxL.shape, jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
    L = k_BxLxKxE.shape[1]
    q_idx_L = index.value + jnp.arange(L)
    if initialized:
      key.value = jax.lax.dynamic_update_slice(key.value, kT_BxKxExL.astype(key.value.dtype), (0, 0, 0, index.value))
      value.value = jax.lax.dynamic_update_slice(value.value, v_BxKxLxE.astype(value.value.dtype),
                                                 (0, 0, index.value, 0))
      seg.value = jax.lax.dynamic_update_slice(seg.value, segment_ids_BxL.astype(jnp.int32), (0, index.value))
      index.value = index.value + L
    return key.value, value.value, seg.value, q_idx_L


class Mlp(nn.Module):
  """GELU-tanh MLP (gpt2) or SwiGLU (LLaMA-like)."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    if cfg.family != "gpt2":
      gate_BxLxF = _constrain(_dense(cfg, cfg.d_ff, "gate", ("embed",), ("mlp",))(x_BxLxD), _BLF)
      up_BxLxF = _constrain(_dense(cfg, cfg.d_ff, "up", ("embed",), ("mlp",))(x_BxLxD), _BLF)
      return _dense(cfg, cfg.d_model, "down", ("mlp",), ("embed",))(nn.silu(gate_BxLxF) * up_BxLxF)
    h_BxLxF = nn.gelu(_constrain(_dense(cfg, cfg.d_ff, "fc_in", ("embed",), ("mlp",))(x_BxLxD), _BLF),
                      approximate=True)
    return _dense(cfg, cfg.d_model, "fc_out", ("mlp",), ("embed",))(h_BxLxF)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x)). `scanned`: returns (x, None) for nn.scan."""
  cfg: TransformerConfig
  scanned: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, decode: bool):
    x_BxLxD = x_BxLxD + Attention(self.cfg, name="attn")(
        _norm(self.cfg, "attn_norm")(x_BxLxD), positions_BxL, segment_ids_BxL, decode)
    x_BxLxD = _constrain(x_BxLxD + Mlp(self.cfg, name="mlp")(_norm(self.cfg, "mlp_norm")(x_BxLxD)), _BLD)
    return (x_BxLxD, None) if self.scanned else x_BxLxD


def _blocks(cfg: TransformerConfig, x_BxLxD, positions_BxL, segment_ids_BxL, decode: bool):
  """The num_layers blocks: unrolled (`layer_{i}`) or one nn.scan (`layers`, params and cache stacked on a
  leading "layers" axis), each wrapped in nn.remat when `cfg.remat` asks (decode, argument 4 with self, static)."""
  block = Block
  if cfg.remat != "none":
    block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers, static_argnums=(4,))
  if not cfg.scan_layers:
    for i in range(cfg.num_layers):
      x_BxLxD = block(cfg, name=f"layer_{i}")(x_BxLxD, positions_BxL, segment_ids_BxL, decode)
    return x_BxLxD
  scanned = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(cfg, scanned=True, name="layers")(x_BxLxD, positions_BxL, segment_ids_BxL, decode)[0]


class Transformer(nn.Module):
  """Decoder-only language model: tokens_BxL -> (logits_BxLxV in float32, h_BxLxD)."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, decode: bool = False,
               logits_slots: tuple[int, int] | None = None):
    """`logits_slots=(a, b)` applies the output head to slots a..b-1 only (logits_Bx(b-a)xV; h stays BxLxD):
    a PPO forward needs logits at the response slots, the sampler's prefill at the last one. Decode leaves the
    activations' layout to GSPMD (parallel.unconstrained; the cache has its own constraint)."""
    cfg = self.cfg
    layout = (parallel.decode_layout() if tokens_BxL.shape[1] == 1 else parallel.unconstrained()) if decode \
        else contextlib.nullcontext()
    with layout:
      if tokens_BxL.shape[1] > cfg.max_len:
        raise ValueError(f"sequence length {tokens_BxL.shape[1]} exceeds TransformerConfig.max_len={cfg.max_len}")
      if segment_ids_BxL is None:
        segment_ids_BxL = jnp.ones(tokens_BxL.shape, jnp.int32)
      if positions_BxL is None:
        if decode:
          raise ValueError("decode=True needs explicit positions_BxL (the slot's position in its sequence)")
        positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
      embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                       embedding_init=_named(nn.initializers.normal(0.02), ("vocab", "embed")), name="embed")
      x_BxLxD = embed(tokens_BxL)
      if cfg.family == "gpt2":
        x_BxLxD = x_BxLxD + nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                                     embedding_init=_named(nn.initializers.normal(0.01), ("positions", "embed")),
                                     name="pos_embed")(positions_BxL)
      x_BxLxD = _blocks(cfg, _constrain(x_BxLxD, _BLD), positions_BxL, segment_ids_BxL, decode)
      h_BxLxD = _constrain(_norm(cfg, "final_norm")(x_BxLxD), _BLD)
      head_in_BxLxD = h_BxLxD if logits_slots is None else h_BxLxD[:, logits_slots[0]:logits_slots[1]]
      if cfg.tie_embeddings:
        logits_BxLxV = embed.attend(head_in_BxLxD)
      else:
        logits_BxLxV = _dense(cfg, cfg.vocab_size, "lm_head", ("embed",), ("vocab",), use_bias=False)(head_in_BxLxD)
      return _constrain(logits_BxLxV.astype(jnp.float32), _BLV), h_BxLxD


class ScalarHead(nn.Module):
  """Dense D -> 1 on the hidden state: per-token scalars_BxL (reward or value)."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, h_BxLxD):
    out_BxLx1 = nn.Dense(1, dtype=jnp.float32, param_dtype=self.cfg.jnp_param_dtype,
                         kernel_init=_named(nn.initializers.normal(1.0 / (self.cfg.d_model + 1) ** 0.5),
                                            ("embed", "scalar")),
                         bias_init=_named(nn.initializers.zeros_init(), ("scalar",)), name="dense")(h_BxLxD.astype(jnp.float32))
    return out_BxLx1[..., 0]


def boxed_params(cfg: TransformerConfig, rng: jax.Array) -> dict:
  """Randomly initialised Transformer params, each boxed with its logical axis names (nn.LogicallyPartitioned)."""
  return Transformer(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(cfg: TransformerConfig, rng: jax.Array) -> dict:
  """Randomly initialised Transformer params as plain arrays (built from a length-1 dummy batch)."""
  return nn.unbox(boxed_params(cfg, rng))


def boxed_head_params(cfg: TransformerConfig, rng: jax.Array) -> dict:
  """Randomly initialised ScalarHead params, boxed with their logical axis names."""
  return ScalarHead(cfg).init(rng, jnp.zeros((1, 1, cfg.d_model), jnp.float32))["params"]


def logical_axes(boxed_fn) -> Any:
  """The logical PartitionSpec of every parameter built by `boxed_fn()` (a function returning a tree of boxed
  params, e.g. `lambda: boxed_params(cfg, key)`), from abstract shapes only (jax.eval_shape: nothing allocated).
  Plain (unboxed) leaves, such as a scalar, get the empty spec (replicated)."""
  return nn.get_partition_spec(jax.eval_shape(boxed_fn))


def init_cache(cfg: TransformerConfig, batch_size: int, length: int) -> dict:
  """Empty KV cache of `length` slots per row (zeros; index 0), without running the model."""
  if length > cfg.max_len:
    raise ValueError(f"cache length {length} exceeds TransformerConfig.max_len={cfg.max_len}")
  shapes = jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((batch_size, length), jnp.int32),
      jnp.zeros((batch_size, length), jnp.int32), decode=True)["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _layer_names(tree) -> list[str]:
  """The `layer_{i}` keys of a dict, checked to be layer_0 .. layer_{n-1}."""
  names = [k for k in tree if re.fullmatch(r"layer_\d+", k)]
  if sorted(names, key=lambda k: int(k[6:])) != [f"layer_{i}" for i in range(len(names))]:
    raise ValueError(f"layer keys {sorted(names)} are not layer_0 .. layer_{len(names) - 1}")
  return [f"layer_{i}" for i in range(len(names))]


def _stack(*xs):
  return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)


def stack_layers(params):
  """Unrolled layout -> scan layout: every dict's `layer_0 .. layer_{n-1}` subtrees become one `layers` subtree
  whose leaves have a leading num_layers axis (host numpy stays numpy). Already-stacked trees pass unchanged."""
  if not isinstance(params, dict) and not hasattr(params, "items"):
    return params
  names = _layer_names(params)
  out = {k: stack_layers(v) for k, v in params.items() if k not in names}
  if names:
    out["layers"] = jax.tree.map(_stack, *[params[k] for k in names])
  return out


def unstack_layers(params):
  """Scan layout -> unrolled layout: every dict's `layers` subtree (leading num_layers axis) becomes
  `layer_0 .. layer_{n-1}`. Already-unrolled trees pass unchanged."""
  if not isinstance(params, dict) and not hasattr(params, "items"):
    return params
  out = {k: unstack_layers(v) for k, v in params.items() if k != "layers"}
  if "layers" in params:
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    out.update({f"layer_{i}": jax.tree.map(lambda x: x[i], params["layers"]) for i in range(n)})
  return out


def to_layout(params, cfg: TransformerConfig):
  """`params` (either layout) in the layer layout `cfg.scan_layers` asks for."""
  return stack_layers(params) if cfg.scan_layers else unstack_layers(params)


def param_count(params) -> int:
  """Total number of parameters in a pytree."""
  return sum(x.size for x in jax.tree.leaves(params))
