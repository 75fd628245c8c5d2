"""Hugging Face config.json <-> TransformerConfig, per architecture (the tensors are hf_import's).

Read: GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM (ARCHITECTURES).
Anything this model does not compute (another activation, biases on o or the MLP, partial rotary, a RoPE type other
than default / linear / llama3, sliding-window attention shorter than the context) is a ValueError naming the file,
the field and its value. Missing optional fields take transformers' defaults of that architecture (Qwen3's
head_dim: 128). Written: the same architecture and model_type, every field needed to reload, RoPE both as
`rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters` (transformers 5).
"""
from __future__ import annotations

from typing import Any

from rlhf_jax.model import TransformerConfig

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}  # -> family (== HF model_type)
CONFIG_FILE = "config.json"
ROPE_TYPES = ("default", "linear", "llama3")
# (qkv_bias, qk_norm) that each LLaMA-like architecture hard-codes
_FEATURES = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False), "qwen3": (False, True)}
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all are the tanh approximation of GELU
_HF_SLIDING_WINDOW = {"mistral": 4096, "qwen2": 4096, "qwen3": 4096}  # transformers' defaults


def _field(hf: dict, name: str, path: str, default: Any = KeyError) -> Any:
  if name in hf and hf[name] is not None:
    return hf[name]
  if default is KeyError:
    raise ValueError(f"{path}: missing field {name!r}")
  return default


def _require(hf: dict, path: str, name: str, allowed: tuple, default: Any) -> None:
  """Raises unless config field `name` (HF default `default`) is one of the values we implement."""
  value = hf.get(name, default)
  if value not in allowed:
    raise ValueError(f"{path}: {name}={value!r} is not supported (supported: {list(allowed)})")


def _gpt2_config(hf: dict, path: str) -> dict[str, Any]:
  """TransformerConfig fields from a GPT2Config mapping; rejects options our model does not implement."""
  _require(hf, path, "activation_function", _GPT2_ACTIVATIONS, "gelu_new")
  _require(hf, path, "scale_attn_weights", (True,), True)
  _require(hf, path, "scale_attn_by_inverse_layer_idx", (False,), False)
  _require(hf, path, "add_cross_attention", (False,), False)
  D, H = _field(hf, "n_embd", path), _field(hf, "n_head", path)
  return dict(vocab_size=_field(hf, "vocab_size", path), d_model=D, num_heads=H, num_kv_heads=H,
              d_ff=_field(hf, "n_inner", path, 4 * D), num_layers=_field(hf, "n_layer", path),
              max_len=_field(hf, "n_positions", path), family="gpt2",
              tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
              norm_eps=float(_field(hf, "layer_norm_epsilon", path, 1e-5)))


def _rope_config(hf: dict, path: str) -> dict[str, Any]:
  """rope_theta and the scaling from `rope_parameters` (transformers 5), else `rope_scaling` + top-level theta."""
  name = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  rope = hf.get(name) or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(f"{path}: {name} rope_type={kind!r} ({rope}) is not supported (supported: {list(ROPE_TYPES)})")
  factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if factor not in (None, 1, 1.0):
    raise ValueError(f"{path}: partial_rotary_factor={factor} is not supported (only 1.0)")
  fields = dict(rope_theta=float(rope.get("rope_theta", _field(hf, "rope_theta", path, 10000.0))))
  where = f"{path} {name}"
  if kind in ("linear", "llama3"):
    fields.update(rope_scaling=kind, rope_factor=float(_field(rope, "factor", where)))
  if kind == "llama3":
    fields.update(rope_low_freq_factor=float(_field(rope, "low_freq_factor", where)),
                  rope_high_freq_factor=float(_field(rope, "high_freq_factor", where)),
                  rope_original_max_len=int(_field(rope, "original_max_position_embeddings", where)))
  return fields


def _check_window(hf: dict, path: str, family: str, max_len: int) -> None:
  """Sliding-window attention is not implemented: a window shorter than the context is a ValueError."""
  if family not in _HF_SLIDING_WINDOW or (family != "mistral" and not hf.get("use_sliding_window", False)):
    return
  window = hf.get("sliding_window", _HF_SLIDING_WINDOW[family])
  if window is not None and window < max_len:
    raise ValueError(f"{path}: sliding_window={window} < max_position_embeddings={max_len}: sliding-window "
                     f"attention is not supported (only sliding_window null or >= max_position_embeddings)")


def _llama_config(hf: dict, path: str, family: str) -> dict[str, Any]:
  """TransformerConfig fields from a Llama/Mistral/Qwen2/Qwen3 config mapping; rejects what we do not implement."""
  _require(hf, path, "hidden_act", ("silu",), "silu")
  if family != "qwen2":  # Qwen2 hard-codes q/k/v biases (and none on o); the others' attention_bias adds o's too
    _require(hf, path, "attention_bias", (False,), False)
  _require(hf, path, "mlp_bias", (False,), False)
  D, H = _field(hf, "hidden_size", path), _field(hf, "num_attention_heads", path)
  E = _field(hf, "head_dim", path, 128 if family == "qwen3" else None)
  max_len = _field(hf, "max_position_embeddings", path)
  _check_window(hf, path, family, max_len)
  qkv_bias, qk_norm = _FEATURES[family]
  return dict(vocab_size=_field(hf, "vocab_size", path), d_model=D, num_heads=H,
              num_kv_heads=_field(hf, "num_key_value_heads", path, H),
              d_ff=_field(hf, "intermediate_size", path), num_layers=_field(hf, "num_hidden_layers", path),
              max_len=max_len, family=family, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              norm_eps=float(_field(hf, "rms_norm_eps", path, 1e-6)), qkv_bias=qkv_bias, qk_norm=qk_norm,
              explicit_head_dim=None if E is None or E * H == D else int(E), **_rope_config(hf, path))


def config_from_hf(hf: dict, path: str = CONFIG_FILE, param_dtype: str = "float32",
                   dtype: str = "float32") -> TransformerConfig:
  """TransformerConfig from a Hugging Face config.json mapping (one of ARCHITECTURES)."""
  archs = hf.get("architectures") or []
  family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
  if family is None:
    raise ValueError(f"{path}: architectures={archs} not supported; expected one of {list(ARCHITECTURES)}")
  fields = _gpt2_config(hf, path) if family == "gpt2" else _llama_config(hf, path, family)
  try:
    return TransformerConfig(**fields, param_dtype=param_dtype, dtype=dtype)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from e


def _rope_json(cfg: TransformerConfig) -> dict[str, Any]:
  """RoPE fields for transformers 4 (rope_theta, rope_scaling) and 5 (rope_parameters)."""
  scaling: dict[str, Any] = {"rope_type": "default"}
  if cfg.rope_scaling != "none":
    scaling = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
  if cfg.rope_scaling == "llama3":
    scaling.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_len)
  out = dict(rope_theta=cfg.rope_theta, rope_parameters={**scaling, "rope_theta": cfg.rope_theta})
  if cfg.rope_scaling != "none":
    out["rope_scaling"] = scaling
  return out


def _llama_json(cfg: TransformerConfig) -> dict[str, Any]:
  """The LLaMA-like architectures' config.json fields; the features must be the ones the architecture has."""
  arch = next(a for a, f in ARCHITECTURES.items() if f == cfg.family)
  qkv_bias, qk_norm = _FEATURES[cfg.family]
  if (cfg.qkv_bias, cfg.qk_norm) != (qkv_bias, qk_norm):
    raise ValueError(f"TransformerConfig family={cfg.family!r} is saved as {arch}, which needs qkv_bias={qkv_bias} "
                     f"and qk_norm={qk_norm}; this config has qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}")
  out = dict(architectures=[arch], model_type=cfg.family, hidden_size=cfg.d_model,
             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
             intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers, max_position_embeddings=cfg.max_len,
             rms_norm_eps=cfg.norm_eps, hidden_act="silu", **_rope_json(cfg))
  if cfg.family in ("llama", "qwen3"):
    out.update(attention_bias=False)
  if cfg.family == "llama":
    out.update(mlp_bias=False)
  if cfg.family == "mistral":
    out.update(sliding_window=None)
  if cfg.family in ("qwen2", "qwen3"):
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
  return out


def hf_config(cfg: TransformerConfig) -> dict[str, Any]:
  """Hugging Face config.json mapping for `cfg` (readable by transformers 4.x and 5.x)."""
  common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.param_dtype,
                torch_dtype=cfg.param_dtype, bos_token_id=None, eos_token_id=None)  # ids belong to the tokenizer
  if cfg.family != "gpt2":
    return dict(**_llama_json(cfg), **common)
  if cfg.num_kv_heads != cfg.num_heads:
    raise ValueError(f"GPT-2 has no grouped-query attention: num_kv_heads={cfg.num_kv_heads} != "
                     f"num_heads={cfg.num_heads}")
  return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=cfg.d_model, n_head=cfg.num_heads,
              n_layer=cfg.num_layers, n_positions=cfg.max_len, n_inner=cfg.d_ff, layer_norm_epsilon=cfg.norm_eps,
              activation_function="gelu_new", scale_attn_weights=True, **common)
