"""Rotary position embeddings (HF rotate-half convention) and the frequency scalings of HF configs.

Dimension letters as in model.py; E2 = E // 2 rotation frequencies per head.

Scalings (`TransformerConfig.rope_scaling`), as transformers' modeling_rope_utils computes them:
  none    inv_freq_i = 1 / θ^(i / E2)
  linear  inv_freq_i / factor (the same as positions / factor)
  llama3  Llama 3.1: with wavelength λ_i = 2π / inv_freq_i, old = original_max_position_embeddings,
          λ_i < old / high_freq_factor: unchanged; λ_i > old / low_freq_factor: inv_freq_i / factor;
          in between: (1 − s) inv_freq_i / factor + s inv_freq_i, s = (old / λ_i − low) / (high − low).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

ROPE_SCALINGS = ("none", "linear", "llama3")


def inv_frequencies(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                    low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                    original_max_len: int = 8192) -> jax.Array:
  """The E2 float32 rotation frequencies of one head (equations in the module docstring)."""
  half = head_dim // 2
  inv_freq_E2 = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  if scaling == "none":
    return inv_freq_E2
  if scaling == "linear":
    return inv_freq_E2 / factor
  if scaling != "llama3":
    raise ValueError(f"rope scaling={scaling!r}; expected one of {ROPE_SCALINGS}")
  low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
  wavelen_E2 = 2 * math.pi / inv_freq_E2
  scaled_E2 = jnp.where(wavelen_E2 > low_wavelen, inv_freq_E2 / factor, inv_freq_E2)
  smooth_E2 = (original_max_len / wavelen_E2 - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed_E2 = (1 - smooth_E2) * scaled_E2 / factor + smooth_E2 * scaled_E2
  medium_E2 = (wavelen_E2 >= high_wavelen) & (wavelen_E2 <= low_wavelen)
  return jnp.where(medium_E2, smoothed_E2, scaled_E2)


def rope(x_BxLxNxE: jax.Array, positions_BxL: jax.Array, theta: float,
         inv_freq_E2: jax.Array | None = None) -> jax.Array:
  """Rotary embedding, HF LLaMA convention (rotate halves): x·cos(pθ) + rotate_half(x)·sin(pθ).
  `inv_freq_E2` (from `inv_frequencies`) overrides the unscaled frequencies of `theta`."""
  half = x_BxLxNxE.shape[-1] // 2
  if inv_freq_E2 is None:
    inv_freq_E2 = inv_frequencies(2 * half, theta)
  angles_BxLxE2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_E2
  cos = jnp.cos(angles_BxLxE2)[:, :, None, :]
  sin = jnp.sin(angles_BxLxE2)[:, :, None, :]
  x1, x2 = x_BxLxNxE[..., :half].astype(jnp.float32), x_BxLxNxE[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxE.dtype)
