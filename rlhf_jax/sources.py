"""Where a stage starts from: the model and tokenizer config groups, resume > `train.init_from` > scratch, external
checkpoints (`hf:DIR`, `gguf:FILE`) with their own tokenizers, a finished workdir's policy, and a LoRA run's base.

Every stage's workdir holds its tokenizer (`tokenizer.model`, or a `tokenizer/` folder for HF / GGUF tokenizers,
see tokenizer.py) and the model config in its checkpoints' metadata, so the next stage can start from it with only
`--config.train.init_from=<workdir>`. A LoRA workdir's checkpoint holds only what trains plus the source of its
base (`lora_base`); `unfold` folds the adapters back in wherever a later stage loads it. stages.py re-exports it all.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import checkpoint, lora, parallel
from rlhf_jax.model import TransformerConfig, boxed_params, init_params, logical_axes, to_layout
from rlhf_jax.tokenizer import BaseTokenizer as Tokenizer
from rlhf_jax.tokenizer import check_vocab, load_tokenizer, train_tokenizer


TOKENIZER_FILE = "tokenizer.model"  # a workdir's sentencepiece tokenizer (HF ones: tokenizer/)


EXTERNAL = ("hf:", "gguf:")  # init_from prefixes of checkpoints made elsewhere


def model_config() -> ml_collections.ConfigDict:
  """The `cfg.model` group: architecture for a run from scratch (a run with init_from takes the source's)."""
  m = ml_collections.ConfigDict()
  m.family = "gpt2"  # gpt2 (LayerNorm, learned positions, GELU) | llama (RMSNorm, RoPE, SwiGLU, GQA)
  m.vocab_size = 0  # 0 = the tokenizer's vocab size; otherwise must equal it
  m.d_model = 128  # D
  m.num_heads = 4  # H
  m.num_kv_heads = 4  # K (< H: grouped-query attention)
  m.d_ff = 512  # F
  m.num_layers = 2  # blocks
  m.max_len = 128  # longest sequence (prompt + response)
  m.tie_embeddings = True  # output projection shares the token embedding
  m.dtype = "float32"  # compute dtype: float32 | bfloat16
  m.param_dtype = "float32"  # parameter dtype
  # how the model runs (also applied to an init_from model; a resumed run keeps its checkpoint's):
  m.scan_layers = False  # blocks as one nn.scan (params stacked under "layers"): compile time independent of depth
  m.remat = "none"  # recompute each block in the backward: none | block | dots (matmul outputs saved)
  m.attention = "auto"  # auto | xla | cudnn (GPU) | rows | batched (see model.ATTENTION)
  return m


RUNTIME_FIELDS = ("scan_layers", "remat", "attention")  # cfg.model fields that override an init_from model's


def _with_runtime(model: TransformerConfig, cfg: ml_collections.ConfigDict) -> TransformerConfig:
  """`model` with cfg.model's RUNTIME_FIELDS (how it runs, not what it computes)."""
  return dataclasses.replace(model, **{f: cfg.model[f] for f in RUNTIME_FIELDS if f in cfg.model})


def tokenizer_config() -> ml_collections.ConfigDict:
  """The `cfg.tokenizer` group."""
  t = ml_collections.ConfigDict()
  t.path = ""  # .model / tokenizer.json / HF folder / .gguf; "" = init_from's, else train one on data.train
  t.vocab_size = 512  # when training one
  t.model_type = "bpe"  # bpe | unigram | char | word
  return t


def checked_files(spec: str, field: str) -> list[str] | str:
  """Comma-separated local files (each must exist and be non-empty) or a `tfds:` name, validated up front."""
  if not spec:
    raise ValueError(f"config {field} is empty: give a data file or tfds:NAME")
  if spec.startswith("tfds:"):
    return spec
  files = [f for f in spec.split(",") if f]
  for f in files:
    if not os.path.isfile(f):
      raise ValueError(f"config {field}: data file {f!r} does not exist")
    if os.path.getsize(f) == 0:
      raise ValueError(f"config {field}: data file {f!r} is empty")
  return files


@dataclasses.dataclass
class Init:
  """What a stage starts from: the model config, tokenizer and (optionally) a params loader for init_from."""
  model: TransformerConfig
  tokenizer: Tokenizer
  params_fn: Callable[[], Any] | None = None


def source_meta(workdir: str) -> dict:
  """The metadata of the latest checkpoint of another stage's workdir."""
  return checkpoint.load_extra(workdir).get("meta", {})


def resolve_init(cfg: ml_collections.ConfigDict, workdir: str, train_files) -> Init:
  """Model config + tokenizer: resume (own workdir) > train.init_from (workdir, hf:DIR or gguf:FILE) > scratch."""
  source = cfg.train.init_from
  own = checkpoint.has_checkpoint(workdir)
  if own:
    meta = source_meta(workdir)
    model = TransformerConfig.from_dict(meta["model"])
    return Init(model, chat_tokenizer(cfg, load_tokenizer(workdir)))
  if source.startswith(EXTERNAL):
    model, params, tok = load_external(source, cfg.tokenizer.path)
    return Init(_with_runtime(model, cfg), chat_tokenizer(cfg, tok), lambda: params)
  if source:
    meta = source_meta(source)
    if "model" not in meta:
      raise ValueError(f"config train.init_from={source!r}: checkpoint has no model metadata")
    model = _with_runtime(TransformerConfig.from_dict(meta["model"]), cfg)
    tok = load_tokenizer(cfg.tokenizer.path or source)
    check_vocab(tok, model.vocab_size, f"train.init_from={source!r} model.vocab_size",
                exact=tok.kind == "sentencepiece")
    params_fn = lambda: unfold(checkpoint.load_params(source)[0], meta)
    return Init(model, chat_tokenizer(cfg, tok), params_fn)
  tok = _scratch_tokenizer(cfg, workdir, train_files)
  m = cfg.model.to_dict()
  m["vocab_size"] = m["vocab_size"] or tok.vocab_size
  model = TransformerConfig.from_dict(m)
  check_vocab(tok, model.vocab_size, "config model.vocab_size")
  return Init(model, chat_tokenizer(cfg, tok))


def chat_tokenizer(cfg: ml_collections.ConfigDict, tok: Tokenizer) -> Tokenizer:
  """`tok`, rendering prompts with its chat template when config data.chat_template is set."""
  return tok.with_chat_template() if cfg.get("data", {}).get("chat_template", False) else tok


def load_external(source: str, tokenizer_path: str = "") -> tuple[TransformerConfig, Any, Tokenizer]:
  """(model config, params, tokenizer) of `hf:DIR` or `gguf:FILE`: the checkpoint's own tokenizer unless
  `tokenizer_path` (config tokenizer.path) is given; the model may have more embedding rows than tokens."""
  kind, path = source.split(":", 1)
  try:
    tok = load_tokenizer(tokenizer_path or path)
  except ValueError as e:
    if tokenizer_path:
      raise
    raise ValueError(f"config train.init_from={source!r} has no tokenizer: pass --config.tokenizer.path ({e})") from e
  if kind == "hf":
    from rlhf_jax import hf_import
    model, params = hf_import.load_hf_checkpoint(path)
  else:
    from rlhf_jax import gguf_import
    model, params = gguf_import.load_gguf_checkpoint(path)
  check_vocab(tok, model.vocab_size, f"{source} vocab_size", exact=False)
  return model, params, tok


def _scratch_tokenizer(cfg, workdir: str, train_files) -> Tokenizer:
  if cfg.tokenizer.path:
    return load_tokenizer(cfg.tokenizer.path)
  if isinstance(train_files, str):
    raise ValueError("config tokenizer.path is required when data.train is a tfds: dataset")
  os.makedirs(workdir, exist_ok=True)
  prefix = os.path.join(workdir, "tokenizer")
  return train_tokenizer(train_files, prefix, cfg.tokenizer.vocab_size, cfg.tokenizer.model_type)


def install_tokenizer(tok: Tokenizer, workdir: str) -> None:
  """Writes the tokenizer into the workdir (tokenizer.model or tokenizer/), so the next stage finds it there."""
  tok.save(workdir)


def checked_params_fn(init: Init, source: str) -> Callable[[Any], Any] | None:
  """init_from loader that checks the loaded tree matches the configured model's."""
  if init.params_fn is None:
    return None

  def load(fresh):
    params = to_layout(init.params_fn(), init.model)  # a checkpoint of the other layer layout converts here
    checkpoint.check_same_structure(fresh, params, f"config train.init_from={source!r}")
    logging.info("initialised params from %s", source)
    return jax.tree.map(lambda f, p: p.astype(f.dtype), fresh, params)

  return load


@dataclasses.dataclass
class LoraRun:
  """A LoRA stage's settings, its frozen base (merged source params, in the base dtype) and checkpoint metadata."""
  spec: lora.Spec
  base: Any
  meta: dict


def lora_run(cfg: ml_collections.ConfigDict, workdir: str, init: Init, spec: lora.Spec) -> LoraRun | None:
  """The base of a LoRA run: resume: the `lora_base` its checkpoint names (same rank/alpha/targets, else an error
  naming the field and both values); else `train.init_from`. None when `lora.rank` is 0."""
  own = checkpoint.has_checkpoint(workdir)
  meta = source_meta(workdir) if own else {}
  if own:
    lora.check_resume(meta.get("lora"), spec, workdir)
  if not spec.enabled:
    return None
  source = meta["lora_base"] if own else cfg.train.init_from
  if not source:
    raise ValueError(f"config lora.rank={spec.rank} needs train.init_from: the base model the adapters train on")
  base = init.params_fn() if not own and init.params_fn else base_params(source)
  fresh = jax.eval_shape(lambda: init_params(init.model, jax.random.PRNGKey(0)))
  checkpoint.check_same_structure(fresh, base, f"lora base {source!r}")
  base = lora.cast_base(jax.tree.map(lambda f, p: np.asarray(p).astype(f.dtype), fresh, base), cfg.lora.base_dtype)
  return LoraRun(spec, base, {"lora": {**spec.meta(), "base_dtype": cfg.lora.base_dtype}, "lora_base": source})


def base_params(source: str):
  """Transformer params of a policy source (hf:DIR or a pretraining/SFT/PPO workdir, LoRA adapters folded in)."""
  if source.startswith("hf:"):
    from rlhf_jax import hf_import
    return hf_import.load_hf_checkpoint(source[3:])[1]
  return load_policy(source, "lora base")[1]


def unfold(params, meta: dict, key: str | None = None):
  """A checkpoint's params as the full tree: LoRA adapters (when its meta says so) folded into their base."""
  saved = meta.get("lora") or {}
  if not saved.get("rank"):
    return params
  spec = lora.Spec(saved["rank"], saved["alpha"], tuple(saved["targets"]))
  base = lora.cast_base(base_params(meta["lora_base"]), saved.get("base_dtype", ""))
  full = lora.join(params, base, spec, key, merged=True)
  base_dtype = lambda m, b: np.asarray(m).astype(np.asarray(b).dtype)
  return jax.tree.map(base_dtype, full, base) if key is None else dict(full, **{key: jax.tree.map(
      base_dtype, full[key], base)})


def lora_axes(lo: LoraRun, model: TransformerConfig, trainable_axes: dict | None = None) -> tuple[dict, Any]:
  """(logical specs of the trainable tree {"adapters", heads...}, of the frozen base): adapters named after their
  base kernels (lora.adapter_axes); `trainable_axes` gives the other groups' (an RM's heads)."""
  base_axes = logical_axes(lambda: boxed_params(model, jax.random.PRNGKey(0)))
  adapters = jax.eval_shape(lambda: lora.init(lo.base, lo.spec, jax.random.PRNGKey(0)))
  return lora.trainable_axes(base_axes, adapters, lo.spec, trainable_axes), base_axes


def check_init_model(init: Init, mesh, source: str) -> None:
  """The resolved model (resumed or from init_from) against the mesh (see parallel.check_model)."""
  parallel.check_model(init.model, mesh, "config model" if not source else f"the model of train.init_from={source!r}:"
                       " model")


def load_policy(workdir: str, field: str = "train.init_from") -> tuple[TransformerConfig, Any, Tokenizer]:
  """(model config, Transformer params, tokenizer) of a pretraining/SFT/PPO/DPO workdir (or hf:DIR / gguf:FILE)."""
  if workdir.startswith(EXTERNAL):
    return load_external(workdir)
  meta = source_meta(workdir)
  if meta.get("stage") not in ("pretrain", "sft", "ppo", "dpo"):
    raise ValueError(f"config {field}={workdir!r} is a {meta.get('stage')!r} workdir, not a policy; give a "
                     f"pretraining or SFT workdir")
  params, _ = checkpoint.load_params(workdir)
  if meta.get("stage") in ("ppo", "dpo"):
    params = params["policy"]
  params = unfold(params, meta)
  return TransformerConfig.from_dict(meta["model"]), params, load_tokenizer(workdir)
