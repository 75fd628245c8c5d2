"""Hugging Face safetensors checkpoints <-> (TransformerConfig, params): GPT2LMHeadModel, LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM (config.json fields: hf_config.py).

No torch: tensors are read with `safetensors.safe_open(framework="np")`; bfloat16 arrives as an ml_dtypes
array (importing ml_dtypes registers the dtype with NumPy). A directory holds `config.json` and either
`model.safetensors` or `model.safetensors.index.json` plus the shards it names.

Layouts: GPT-2's Conv1D stores weights [in, out] and fuses q, k, v into `c_attn` [D, 3D]; LLaMA's nn.Linear
stores [out, in] (so do Mistral and Qwen, which add q/k/v biases [H*E] and per-head q/k norm scales [E]).
Heads are the major factor of every H*E axis, matching our (D,H,E) / (H,E,D) DenseGeneral kernels. HF LLaMA-like
q/k weights are already in the rotate-half layout that `model.rope` uses.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers "bfloat16" with NumPy so safe_open can return BF16 tensors)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rlhf_jax.hf_config import ARCHITECTURES, CONFIG_FILE, config_from_hf, hf_config  # noqa: F401 (re-exported)
from rlhf_jax.model import TransformerConfig, unstack_layers

WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_IGNORED = {  # buffers some checkpoints carry that are not parameters
    "gpt2": re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$"),
    "llama": re.compile(r"\.rotary_emb\.inv_freq$"),  # and every LLaMA-like family
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


def _attention_extras(cfg: TransformerConfig, hf: str, us: str) -> list[_Spec]:
  """Qwen2's q/k/v biases and Qwen3's per-head q/k norm scales, when cfg has them."""
  H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  specs = []
  if cfg.qkv_bias:
    specs += [_one(f"{hf}self_attn.{n}_proj.bias", (N * E,), f"{us}attn/{n}/bias", (N, E))
              for n, N in (("q", H), ("k", K), ("v", K))]
  if cfg.qk_norm:
    specs += [_one(f"{hf}self_attn.{n}_norm.weight", (E,), f"{us}attn/{n}_norm/scale", (E,)) for n in "qk"]
  return specs


def _llama_specs(cfg: TransformerConfig) -> list[_Spec]:
  """LLaMA-like tensor names (nn.Linear weights [out, in]) and our matching leaves."""
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
    ] + _attention_extras(cfg, hf, us)
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
  if cfg.family != "gpt2":
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
  """Reads a safetensors directory of one of ARCHITECTURES into (TransformerConfig, params)."""
  if not os.path.isdir(directory):
    raise ValueError(f"{directory}: not a directory")
  config_path = os.path.join(directory, CONFIG_FILE)
  cfg = config_from_hf(_read_json(config_path), config_path, param_dtype, dtype)
  weight_map = _weight_map(directory)
  with contextlib.ExitStack() as stack:
    reader = _Reader(weight_map, stack)
    params = params_from_hf(cfg, lambda name, shape: reader.get(name, shape, config_path), weight_map)
    ignored = _IGNORED["gpt2" if cfg.family == "gpt2" else "llama"]
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
