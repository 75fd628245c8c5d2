"""llama.cpp GGUF files (llama, qwen2, qwen3 architectures) -> (TransformerConfig, params). Needs the `gguf` extra.

Hyper-parameters come from the `{arch}.*` metadata keys (qwen2 adds q/k/v biases, qwen3 q/k norms and
key_length); the vocabulary size from `token_embd`'s rows; the head is tied when the file has no `output.weight`. Tensors are dequantized to float32 by `gguf.quants.dequantize`
(SUPPORTED_TYPES) and renamed to their Hugging Face names, so hf_import's layout code builds the params.

For llama, llama.cpp's converter permutes the rows of each q and k head from HF's rotate-half layout (pairs
(i, i + E/2)) to interleaved pairs (2i, 2i + 1) for its GPT-J-style RoPE; `_unpermute` undoes it so `model.rope`
applies. qwen2 and qwen3 keep HF's layout (llama.cpp's NEOX RoPE is rotate-half).
Llama 3.1's `llama3` rope scaling is no metadata key but a `rope_freqs.weight` tensor of per-frequency factors; it
is read back into TransformerConfig's rope_scaling fields (`_llama3_rope`) and checked against every factor.
GGUF stores shapes innermost first (ne = [in, out]); the tensor arrays are row-major [out, in], like nn.Linear.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from rlhf_jax import hf_import
from rlhf_jax.model import TransformerConfig
from rlhf_jax.rope import inv_frequencies

ARCHITECTURES = ("llama", "qwen2", "qwen3")  # == the TransformerConfig family
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
          "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading .gguf files needs the optional `gguf` package: pip install -e '.[gguf]'") from e
  return gguf


def hf_name(gguf_name: str) -> str | None:
  """The Hugging Face tensor name of a GGUF llama/qwen2/qwen3 tensor name (None when it has none)."""
  if gguf_name in _TOP:
    return _TOP[gguf_name]
  parts = gguf_name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK and parts[3] in ("weight", "bias"):
    return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
  return None


def _unpermute(w_RxD: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of convert_hf_to_gguf's `permute`: per head, rows (i, j) of an (E/2, 2) grid go back to j*E/2 + i."""
  E = w_RxD.shape[0] // n_head
  return w_RxD.reshape(n_head, E // 2, 2, *w_RxD.shape[1:]).swapaxes(1, 2).reshape(w_RxD.shape)


class _Meta:
  """Typed access to a GGUF file's metadata, every error naming the file and the key."""

  def __init__(self, reader, path: str):
    self.reader, self.path = reader, path

  def get(self, key: str, default: Any = KeyError, kind: type = int) -> Any:
    field = self.reader.fields.get(key)
    if field is None:
      if default is KeyError:
        raise ValueError(f"{self.path}: metadata {key!r} is missing")
      return default
    value = field.contents()
    if kind is str and isinstance(value, str):
      return value
    if kind in (int, float) and isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, bool):
      return kind(value)
    raise ValueError(f"{self.path}: metadata {key}={value!r} is not a single {kind.__name__} (not supported)")


def _rope(meta: _Meta, a: str) -> dict[str, Any]:
  """RoPE fields: base frequency and the scaling llama.cpp records in metadata (none or linear; Llama 3.1's llama3
  scaling is a tensor instead, `_llama3_rope`)."""
  fields = dict(rope_theta=meta.get(f"{a}.rope.freq_base", 10000.0, float))
  kind = meta.get(f"{a}.rope.scaling.type", "none", str)
  if kind == "linear":
    fields.update(rope_scaling="linear", rope_factor=meta.get(f"{a}.rope.scaling.factor", kind=float))
  elif kind != "none":
    raise ValueError(f"{meta.path}: metadata {a}.rope.scaling.type={kind!r} is not supported "
                     f"(supported: ['none', 'linear'])")
  return fields


ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's Llama 3.1 frequency factors: freq_i = base_freq_i / factor_i


def _llama3_rope(factors_E2: np.ndarray, fields: dict, E: int, path: str) -> dict[str, Any]:
  """The llama3 rope_scaling fields (rope.py) that reproduce a `rope_freqs.weight` tensor of frequency factors.

  convert_hf_to_gguf writes factor_i = 1 (short wavelengths), `factor` (long ones) and 1 / ((1 − s)/factor + s)
  in between, s = (old / λ_i − low) / (high − low). Only old/(high − low) and low/(high − low) shape s, so
  low = 1 is taken (as every Llama 3.x config has) and the other two are solved from the intermediate factors
  (high = 4 when fewer than two are intermediate); the result is checked against every factor.
  """
  factors_E2 = np.asarray(factors_E2, np.float64).reshape(-1)
  if factors_E2.shape != (E // 2,):
    raise ValueError(f"{path}: tensor {ROPE_FREQS!r} has {factors_E2.size} values; expected head dim / 2 = {E // 2}")
  if np.any(factors_E2 <= 0):
    raise ValueError(f"{path}: tensor {ROPE_FREQS!r} has non-positive frequency factors")
  if fields.get("rope_scaling", "none") != "none":
    raise ValueError(f"{path}: both metadata rope scaling {fields['rope_scaling']!r} and tensor {ROPE_FREQS!r}")
  inv_E2 = np.asarray(inv_frequencies(E, fields["rope_theta"]), np.float64)
  factor = float(factors_E2.max())
  if np.allclose(factors_E2, 1.0, rtol=1e-6):
    return {}
  wavelen_E2 = 2 * np.pi / inv_E2
  medium = (factors_E2 > 1 + 1e-6) & (factors_E2 < factor * (1 - 1e-6))
  s_E2 = (1 / factors_E2 - 1 / factor) / (1 - 1 / factor)  # 1 where unchanged, 0 where divided by `factor`
  low = 1.0
  if medium.sum() >= 2:  # s = a / λ + c with a = old / (high − low), c = −low / (high − low)
    a, c = np.polyfit(1 / wavelen_E2[medium], s_E2[medium], 1)
    high, old = (low - low / c, -a * low / c) if c < 0 else (4.0, 0.0)
  elif medium.sum() == 1:
    high = 4.0
    old = float(wavelen_E2[medium][0] * (s_E2[medium][0] * (high - low) + low))
  else:  # a clean step: old / low just under the shortest divided wavelength
    high = 4.0
    old = float(wavelen_E2[factors_E2 > 1 + 1e-6].min() * 0.999)
  got = dict(rope_scaling="llama3", rope_factor=factor, rope_low_freq_factor=low, rope_high_freq_factor=float(high),
             rope_original_max_len=int(round(old)))
  rebuilt_E2 = inv_E2 / np.asarray(inv_frequencies(E, fields["rope_theta"], "llama3", factor, low, high,
                                                    got["rope_original_max_len"]), np.float64)
  if old <= 0 or not np.allclose(rebuilt_E2, factors_E2, rtol=1e-4):
    raise ValueError(f"{path}: tensor {ROPE_FREQS!r} (factors {np.round(factors_E2, 4).tolist()}) is not a llama3 "
                     "rope scaling (the only frequency-factor scaling supported)")
  return got


def config_from_gguf(reader, path: str, param_dtype: str = "float32", dtype: str = "float32") -> TransformerConfig:
  """TransformerConfig from a GGUF reader's {arch}.* metadata and tensor list."""
  meta = _Meta(reader, path)
  arch = meta.get("general.architecture", kind=str)
  if arch not in ARCHITECTURES:
    raise ValueError(f"{path}: metadata general.architecture={arch!r} is not supported (supported: "
                     f"{list(ARCHITECTURES)})")
  tensors = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in tensors:
    raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
  if meta.get(f"{arch}.expert_count", 0) > 0:
    raise ValueError(f"{path}: metadata {arch}.expert_count={meta.get(f'{arch}.expert_count')} (mixture of "
                     f"experts) is not supported")
  D, H = meta.get(f"{arch}.embedding_length"), meta.get(f"{arch}.attention.head_count")
  E = meta.get(f"{arch}.attention.key_length", D // H)
  for key in (f"{arch}.attention.value_length", f"{arch}.rope.dimension_count"):
    if meta.get(key, E) != E:
      raise ValueError(f"{path}: metadata {key}={meta.get(key)} != head dim {E} is not supported")
  V = int(tensors["token_embd.weight"].shape[-1])
  if meta.get(f"{arch}.vocab_size", V) != V:
    raise ValueError(f"{path}: metadata {arch}.vocab_size={meta.get(f'{arch}.vocab_size')} != token_embd rows {V}")
  fields = dict(vocab_size=V, d_model=D, num_heads=H, num_kv_heads=meta.get(f"{arch}.attention.head_count_kv", H),
                d_ff=meta.get(f"{arch}.feed_forward_length"), num_layers=meta.get(f"{arch}.block_count"),
                max_len=meta.get(f"{arch}.context_length"), family=arch, tie_embeddings="output.weight" not in tensors,
                qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
                norm_eps=meta.get(f"{arch}.attention.layer_norm_rms_epsilon", kind=float), **_rope(meta, arch))
  if E * H != D:
    fields["explicit_head_dim"] = E
  if ROPE_FREQS in tensors:
    gguf = _gguf()
    fields.update(_llama3_rope(gguf.quants.dequantize(tensors[ROPE_FREQS].data, tensors[ROPE_FREQS].tensor_type),
                               fields, E, path))
  try:
    return TransformerConfig(**fields, param_dtype=param_dtype, dtype=dtype)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from e


def _dequantized(gguf, tensor, path: str) -> np.ndarray:
  """float32 array of a GGUF tensor, shaped [out, in] (ne reversed)."""
  kind = tensor.tensor_type.name
  if kind not in SUPPORTED_TYPES:
    raise ValueError(f"{path}: tensor {tensor.name!r} has type {kind}, not supported (supported: "
                     f"{list(SUPPORTED_TYPES)})")
  x = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
  return x.reshape(tuple(int(n) for n in reversed(tensor.shape)))


def _open(gguf, path: str):
  if not os.path.isfile(path):
    raise ValueError(f"{path}: file not found")
  try:
    return gguf.GGUFReader(path)
  except (ValueError, OSError, IndexError) as e:  # bad magic, truncated file
    raise ValueError(f"{path}: not a readable GGUF file ({e})") from e


def load_gguf_checkpoint(path: str, param_dtype: str = "float32",
                         dtype: str = "float32") -> tuple[TransformerConfig, dict]:
  """Reads a llama/qwen2/qwen3 .gguf file into (TransformerConfig, params), dequantized (llama: un-permuted)."""
  gguf = _gguf()
  reader = _open(gguf, path)
  cfg = config_from_gguf(reader, path, param_dtype, dtype)
  by_hf = {}
  for t in reader.tensors:
    if t.name == ROPE_FREQS:  # read into cfg's rope_scaling by config_from_gguf
      continue
    name = hf_name(t.name)
    if name is None:
      raise ValueError(f"{path}: unexpected tensor {t.name!r} (type {t.tensor_type.name}, shape "
                       f"{[int(n) for n in t.shape]}) not supported for general.architecture={cfg.family!r}")
    by_hf[name] = t
  used = set()

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in by_hf:
      raise ValueError(f"{path}: tensor for {name!r} (shape {shape}) is missing")
    x = _dequantized(gguf, by_hf[name], path)
    if x.shape != tuple(shape):
      raise ValueError(f"{path}: tensor {by_hf[name].name!r} has shape {x.shape}; expected {shape} from the "
                       f"metadata")
    used.add(name)
    if cfg.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      x = _unpermute(x, cfg.num_heads if name.endswith("q_proj.weight") else cfg.num_kv_heads)
    return x

  params = hf_import.params_from_hf(cfg, get)
  extra = sorted(by_hf[n].name for n in set(by_hf) - used)
  if extra:
    raise ValueError(f"{path}: tensors {extra} not used by the model the metadata describes")
  return cfg, params
