"""Hugging Face safetensors checkpoints (GPT2LMHeadModel, LlamaForCausalLM) <-> (TransformerConfig, params).

No torch: tensors are read with `safetensors.safe_open(framework="np")`; bfloat16 arrives as an ml_dtypes
array (importing ml_dtypes registers the dtype with NumPy). A directory holds `config.json` and either
`model.safetensors` or `model.safetensors.index.json` plus the shards it names.

Layouts: GPT-2's Conv1D stores weights [in, out] and fuses q, k, v into `c_attn` [D, 3D]; LLaMA's nn.Linear
stores [out, in]. Heads are the major factor of every H*E axis in both, matching our (D,H,E) / (H,E,D)
DenseGeneral kernels. HF LLaMA q/k weights are already in the rotate-half layout that `model.rope` uses.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from typing import Any

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers "bfloat16" with NumPy so safe_open can return BF16 tensors)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rlhf_jax.model import TransformerConfig, unstack_layers

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all are the tanh approximation of GELU
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_IGNORED = {  # buffers some checkpoints carry that are not parameters
    "gpt2": re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$"),
    "llama": re.compile(r"\.rotary_emb\.inv_freq$"),
}


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One HF tensor <-> one or more of our leaves (GPT-2's fused c_attn holds q, k and v)."""
  hf_name: str
  hf_shape: tuple[int, ...]
  paths: tuple[tuple[str, ...], ...]
  shapes: tuple[tuple[int, ...], ...]
  transpose: bool = False  # nn.Linear [out, in] vs our [in, out]


def _one(hf_name, hf_shape, path, shape, transpose=False) -> _Spec:
  return _Spec(hf_name, tuple(hf_shape), (tuple(path.split("/")),), (tuple(shape),), transpose)


def _gpt2_specs(cfg: TransformerConfig, prefix: str) -> list[_Spec]:
  """GPT2LMHeadModel tensor names (Conv1D weights [in, out]) and our matching leaves."""
  V, D, H, E, F = cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff
  specs = [_one(f"{prefix}wte.weight", (V, D), "embed/embedding", (V, D)),
           _one(f"{prefix}wpe.weight", (cfg.max_len, D), "pos_embed/embedding", (cfg.max_len, D))]
  for i in range(cfg.num_layers):
    hf, us = f"{prefix}h.{i}.", f"layer_{i}/"
    qkv = tuple(tuple(f"{us}attn/{n}/kernel".split("/")) for n in "qkv")
    qkv_bias = tuple(tuple(f"{us}attn/{n}/bias".split("/")) for n in "qkv")
    specs += [
        _one(f"{hf}ln_1.weight", (D,), f"{us}attn_norm/scale", (D,)),
        _one(f"{hf}ln_1.bias", (D,), f"{us}attn_norm/bias", (D,)),
        _Spec(f"{hf}attn.c_attn.weight", (D, 3 * D), qkv, ((D, H, E),) * 3),
        _Spec(f"{hf}attn.c_attn.bias", (3 * D,), qkv_bias, ((H, E),) * 3),
        _one(f"{hf}attn.c_proj.weight", (D, D), f"{us}attn/o/kernel", (H, E, D)),
        _one(f"{hf}attn.c_proj.bias", (D,), f"{us}attn/o/bias", (D,)),
        _one(f"{hf}ln_2.weight", (D,), f"{us}mlp_norm/scale", (D,)),
        _one(f"{hf}ln_2.bias", (D,), f"{us}mlp_norm/bias", (D,)),
        _one(f"{hf}mlp.c_fc.weight", (D, F), f"{us}mlp/fc_in/kernel", (D, F)),
        _one(f"{hf}mlp.c_fc.bias", (F,), f"{us}mlp/fc_in/bias", (F,)),
        _one(f"{hf}mlp.c_proj.weight", (F, D), f"{us}mlp/fc_out/kernel", (F, D)),
        _one(f"{hf}mlp.c_proj.bias", (D,), f"{us}mlp/fc_out/bias", (D,)),
    ]
  specs += [_one(f"{prefix}ln_f.weight", (D,), "final_norm/scale", (D,)),
            _one(f"{prefix}ln_f.bias", (D,), "final_norm/bias", (D,))]
  if not cfg.tie_embeddings:
    specs.append(_one("lm_head.weight", (V, D), "lm_head/kernel", (D, V), transpose=True))
  return specs


def _llama_specs(cfg: TransformerConfig) -> list[_Spec]:
  """LlamaForCausalLM tensor names (nn.Linear weights [out, in]) and our matching leaves."""
  V, D, H, K, E, F = cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  specs = [_one("model.embed_tokens.weight", (V, D), "embed/embedding", (V, D))]
  for i in range(cfg.num_layers):
    hf, us = f"model.layers.{i}.", f"layer_{i}/"
    specs += [
        _one(f"{hf}input_layernorm.weight", (D,), f"{us}attn_norm/scale", (D,)),
        _one(f"{hf}self_attn.q_proj.weight", (H * E, D), f"{us}attn/q/kernel", (D, H, E), transpose=True),
        _one(f"{hf}self_attn.k_proj.weight", (K * E, D), f"{us}attn/k/kernel", (D, K, E), transpose=True),
        _one(f"{hf}self_attn.v_proj.weight", (K * E, D), f"{us}attn/v/kernel", (D, K, E), transpose=True),
        _one(f"{hf}self_attn.o_proj.weight", (D, H * E), f"{us}attn/o/kernel", (H, E, D), transpose=True),
        _one(f"{hf}post_attention_layernorm.weight", (D,), f"{us}mlp_norm/scale", (D,)),
        _one(f"{hf}mlp.gate_proj.weight", (F, D), f"{us}mlp/gate/kernel", (D, F), transpose=True),
        _one(f"{hf}mlp.up_proj.weight", (F, D), f"{us}mlp/up/kernel", (D, F), transpose=True),
        _one(f"{hf}mlp.down_proj.weight", (D, F), f"{us}mlp/down/kernel", (F, D), transpose=True),
    ]
  specs.append(_one("model.norm.weight", (D,), "final_norm/scale", (D,)))
  if not cfg.tie_embeddings:
    specs.append(_one("lm_head.weight", (V, D), "lm_head/kernel", (D, V), transpose=True))
  return specs


def _to_ours(spec: _Spec, x: np.ndarray) -> list[np.ndarray]:
  """HF tensor -> our leaves: transpose a Linear, split a fused last axis, reshape to our kernel shapes."""
  x = x.T if spec.transpose else x
  parts = np.split(x, len(spec.paths), axis=-1)
  return [np.ascontiguousarray(p.reshape(shape)) for p, shape in zip(parts, spec.shapes)]


def _to_hf(spec: _Spec, leaves: list[np.ndarray]) -> np.ndarray:
  """Our leaves -> HF tensor: the exact inverse of `_to_ours`."""
  base = spec.hf_shape[::-1] if spec.transpose else spec.hf_shape
  part = base[:-1] + (base[-1] // len(leaves),)
  x = np.concatenate([leaf.reshape(part) for leaf in leaves], axis=-1)
  return np.ascontiguousarray(x.T if spec.transpose else x)


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


def _llama_rope_theta(hf: dict, path: str) -> float:
  """rope_theta from `rope_parameters` (transformers 5) or top level; only the default RoPE is implemented."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"{path}: RoPE scaling rope_type={rope_type!r} ({rope}) is not supported (only 'default')")
  factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if factor not in (None, 1, 1.0):
    raise ValueError(f"{path}: partial_rotary_factor={factor} is not supported (only 1.0)")
  return float(rope.get("rope_theta", _field(hf, "rope_theta", path, 10000.0)))


def _llama_config(hf: dict, path: str) -> dict[str, Any]:
  """TransformerConfig fields from a LlamaConfig mapping; rejects options our model does not implement."""
  _require(hf, path, "hidden_act", ("silu",), "silu")
  _require(hf, path, "attention_bias", (False,), False)
  _require(hf, path, "mlp_bias", (False,), False)
  D, H = _field(hf, "hidden_size", path), _field(hf, "num_attention_heads", path)
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim * H != D:
    raise ValueError(f"{path}: head_dim={head_dim} * num_attention_heads={H} != hidden_size={D}; not supported")
  return dict(vocab_size=_field(hf, "vocab_size", path), d_model=D, num_heads=H,
              num_kv_heads=_field(hf, "num_key_value_heads", path, H),
              d_ff=_field(hf, "intermediate_size", path), num_layers=_field(hf, "num_hidden_layers", path),
              max_len=_field(hf, "max_position_embeddings", path), family="llama",
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              norm_eps=float(_field(hf, "rms_norm_eps", path, 1e-6)), rope_theta=_llama_rope_theta(hf, path))


def config_from_hf(hf: dict, path: str = CONFIG_FILE, param_dtype: str = "float32",
                   dtype: str = "float32") -> TransformerConfig:
  """TransformerConfig from a Hugging Face config.json mapping (GPT2LMHeadModel or LlamaForCausalLM)."""
  archs = hf.get("architectures") or []
  family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
  if family is None:
    raise ValueError(f"{path}: architectures={archs} not supported; expected one of {list(ARCHITECTURES)}")
  fields = _gpt2_config(hf, path) if family == "gpt2" else _llama_config(hf, path)
  try:
    return TransformerConfig(**fields, param_dtype=param_dtype, dtype=dtype)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from e


def hf_config(cfg: TransformerConfig) -> dict[str, Any]:
  """Hugging Face config.json mapping for `cfg` (readable by transformers 4.x and 5.x)."""
  common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.param_dtype,
                torch_dtype=cfg.param_dtype, bos_token_id=None, eos_token_id=None)  # ids belong to the tokenizer
  if cfg.family == "gpt2":
    if cfg.num_kv_heads != cfg.num_heads:
      raise ValueError(f"GPT-2 has no grouped-query attention: num_kv_heads={cfg.num_kv_heads} != "
                       f"num_heads={cfg.num_heads}")
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=cfg.d_model, n_head=cfg.num_heads,
                n_layer=cfg.num_layers, n_positions=cfg.max_len, n_inner=cfg.d_ff, layer_norm_epsilon=cfg.norm_eps,
                activation_function="gelu_new", scale_attn_weights=True, **common)
  return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.d_model,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers, max_position_embeddings=cfg.max_len,
              rms_norm_eps=cfg.norm_eps, hidden_act="silu", attention_bias=False, mlp_bias=False,
              rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
              **common)


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise ValueError(f"{path}: file not found")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e


def _weight_map(directory: str) -> dict[str, str]:
  """Tensor name -> safetensors file path, from model.safetensors or the shard index."""
  single, index = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, INDEX_FILE)
  if os.path.isfile(single):
    with _open(single) as f:
      return {name: single for name in f.keys()}
  if not os.path.isfile(index):
    raise ValueError(f"{directory}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found")
  weight_map = _read_json(index).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index}: no 'weight_map' mapping tensor names to shard files")
  for shard in sorted(set(weight_map.values())):
    if not os.path.isfile(os.path.join(directory, shard)):
      raise ValueError(f"{index}: shard {shard!r} not found in {directory}")
  return {name: os.path.join(directory, shard) for name, shard in weight_map.items()}


def _open(path: str):
  try:
    return safe_open(path, framework="np")
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


class _Reader:
  """Reads named tensors across the checkpoint's files, checking shapes and remembering which were used."""

  def __init__(self, weight_map: dict[str, str], stack: contextlib.ExitStack):
    self.weight_map, self.used = weight_map, set()
    self.files = {p: stack.enter_context(_open(p)) for p in sorted(set(weight_map.values()))}

  def get(self, name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    if name not in self.weight_map:
      files = sorted({os.path.basename(p) for p in self.weight_map.values()})
      raise ValueError(f"tensor {name!r} (expected shape {shape} from {source}) missing from {files}")
    path = self.weight_map[name]
    try:
      x = self.files[path].get_tensor(name)
    except (SafetensorError, TypeError) as e:  # TypeError: a dtype NumPy cannot represent
      raise ValueError(f"{path}: cannot read tensor {name!r} ({e})") from e
    if tuple(x.shape) != tuple(shape):
      raise ValueError(f"{path}: tensor {name!r} has shape {tuple(x.shape)}; expected {shape} from {source}")
    self.used.add(name)
    return x

  def check_all_used(self, ignored: re.Pattern, source: str) -> None:
    extra = sorted(n for n in set(self.weight_map) - self.used if not ignored.search(n))
    if extra:
      raise ValueError(f"unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''} "
                       f"({len(extra)} in all) not described by {source}")


def _specs(cfg: TransformerConfig, names=()) -> list[_Spec]:
  """Tensor specs for cfg's family; GPT-2 names take the `transformer.` prefix unless `names` lack it."""
  if cfg.family == "llama":
    return _llama_specs(cfg)
  bare = "wte.weight" in names and "transformer.wte.weight" not in names  # original OpenAI-GPT-2 uploads
  return _gpt2_specs(cfg, "" if bare else "transformer.")


def params_from_hf(cfg: TransformerConfig, get, names=()) -> dict:
  """Our params tree from HF-named tensors: `get(hf_name, hf_shape)` returns that tensor (shape checked)."""
  params: dict = {}
  for spec in _specs(cfg, names):
    for path, leaf in zip(spec.paths, _to_ours(spec, get(spec.hf_name, spec.hf_shape))):
      node = params
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = jnp.asarray(leaf, dtype=cfg.jnp_param_dtype)
  return params


def load_hf_checkpoint(directory: str, param_dtype: str = "float32",
                       dtype: str = "float32") -> tuple[TransformerConfig, dict]:
  """Reads a GPT2LMHeadModel / LlamaForCausalLM safetensors directory into (TransformerConfig, params)."""
  if not os.path.isdir(directory):
    raise ValueError(f"{directory}: not a directory")
  config_path = os.path.join(directory, CONFIG_FILE)
  cfg = config_from_hf(_read_json(config_path), config_path, param_dtype, dtype)
  weight_map = _weight_map(directory)
  with contextlib.ExitStack() as stack:
    reader = _Reader(weight_map, stack)
    params = params_from_hf(cfg, lambda name, shape: reader.get(name, shape, config_path), weight_map)
    ignored = _IGNORED[cfg.family]
    if cfg.tie_embeddings:  # a tied checkpoint may still store the head; like transformers, use the embedding
      ignored = re.compile(f"{ignored.pattern}|^lm_head\\.weight$")
    reader.check_all_used(ignored, config_path)
  return cfg, params


def _leaf(params, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
  node = params
  for i, key in enumerate(path):
    if key not in node:
      raise ValueError(f"params has no {'/'.join(path[:i + 1])} (needed for {'/'.join(path)})")
    node = node[key]
  x = np.asarray(node)
  if x.shape != shape:
    raise ValueError(f"params {'/'.join(path)} has shape {x.shape}; expected {shape} from the TransformerConfig")
  return x


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int | None) -> list[dict[str, np.ndarray]]:
  """Splits tensors, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
  shards, size = [{}], 0
  for name, x in tensors.items():
    if max_shard_bytes is not None and shards[-1] and size + x.nbytes > max_shard_bytes:
      shards, size = shards + [{}], 0
    shards[-1][name], size = x, size + x.nbytes
  return shards


def save_hf_checkpoint(cfg: TransformerConfig, params, directory: str, max_shard_bytes: int | None = None) -> None:
  """Writes config.json + model.safetensors (or shards + index when max_shard_bytes is given) in HF format."""
  if max_shard_bytes is not None and max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
  params = unstack_layers(params)  # a scan_layers model's stacked tree, too
  config = hf_config(cfg)
  tensors = {s.hf_name: _to_hf(s, [_leaf(params, p, shape) for p, shape in zip(s.paths, s.shapes)])
             for s in _specs(cfg)}
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(directory):  # a previous checkpoint's weights would shadow or mix with these
    if name in (WEIGHTS_FILE, INDEX_FILE) or _SHARD_RE.match(name):
      os.remove(os.path.join(directory, name))
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  shards = _shards(tensors, max_shard_bytes)
  if max_shard_bytes is None:
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, file_name), metadata={"format": "pt"})
    weight_map.update({name: file_name for name in shard})
  index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())}, "weight_map": weight_map}
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
