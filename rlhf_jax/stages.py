"""The supervised stages on the shared trainer: pretraining and SFT (next-token loss), and the reward model.

Each `run_*(cfg, workdir)` validates its inputs before writing anything, resolves the model and tokenizer
(resume > `train.init_from` > scratch), builds the loaders and calls `trainer.train_loop`. Every stage's
workdir holds its tokenizer (`tokenizer.model`, or a `tokenizer/` folder for HF / GGUF tokenizers, see
tokenizer.py) and the model config in its checkpoints' metadata, so the next stage can start from it with only
`--config.train.init_from=<workdir>`. `hf:DIR` and `gguf:FILE` sources bring their own tokenizer.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import checkpoint, data, lora, losses, optimizer, parallel, trainer
from rlhf_jax.model import (TransformerConfig, boxed_head_params, boxed_params, init_params, logical_axes,
                            to_layout)
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


def lm_data_config(seq_len: int = 128, batch_size: int = 16) -> ml_collections.ConfigDict:
  """The `cfg.data` group of the next-token stages."""
  d = ml_collections.ConfigDict()
  d.train = ""  # text file(s) (comma-separated; JSONL prompt/response for SFT) or tfds:NAME[:SPLIT]
  d.eval = ""  # held-out file(s) in the same format ("" = no eval)
  d.text_key = "text"  # feature holding the text in a registered TFDS dataset
  d.seq_len = seq_len  # packed row length L (<= model.max_len)
  d.batch_size = batch_size  # global rows per step (divisible by the device count)
  d.seed = 0  # shuffling seed (order is a function of seed and epoch)
  d.truncate = False  # SFT: cut long prompts from the left instead of raising
  d.chat_template = False  # True: prompts rendered with the tokenizer's chat template (later stages keep it)
  return d


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


def _source_meta(workdir: str) -> dict:
  """The metadata of the latest checkpoint of another stage's workdir."""
  return checkpoint.load_extra(workdir).get("meta", {})


def resolve_init(cfg: ml_collections.ConfigDict, workdir: str, train_files) -> Init:
  """Model config + tokenizer: resume (own workdir) > train.init_from (workdir, hf:DIR or gguf:FILE) > scratch."""
  source = cfg.train.init_from
  own = checkpoint.has_checkpoint(workdir)
  if own:
    meta = _source_meta(workdir)
    model = TransformerConfig.from_dict(meta["model"])
    return Init(model, chat_tokenizer(cfg, load_tokenizer(workdir)))
  if source.startswith(EXTERNAL):
    model, params, tok = load_external(source, cfg.tokenizer.path)
    return Init(_with_runtime(model, cfg), chat_tokenizer(cfg, tok), lambda: params)
  if source:
    meta = _source_meta(source)
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
  meta = _source_meta(workdir) if own else {}
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
  specs = {"adapters": lora.adapter_axes(base_axes, adapters, lo.spec)}
  specs.update({k: v for k, v in (trainable_axes or {}).items() if k != "backbone"})
  return specs, base_axes


def _hosts(mesh=None) -> dict:
  """Loader keywords: this host's index and count, and (with a mesh) the batch shards its rows must divide by."""
  out = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if mesh is not None:
    out["local_device_count"] = parallel.local_batch_shards(mesh)
  return out


def stage_mesh(cfg: ml_collections.ConfigDict, workdir: str) -> Any:
  """The device mesh of `cfg.mesh`, validated with the scratch model (`cfg.model`) before anything is written."""
  mesh = parallel.make_mesh(cfg.mesh)
  if not cfg.train.init_from and not checkpoint.has_checkpoint(workdir):
    parallel.check_model(cfg.model, mesh, "config model")
  return mesh


def check_init_model(init: Init, mesh, source: str) -> None:
  """The resolved model (resumed or from init_from) against the mesh (see parallel.check_model)."""
  parallel.check_model(init.model, mesh, "config model" if not source else f"the model of train.init_from={source!r}:"
                       " model")


def _eval_fn(make, eval_files, max_batches: int):
  """A callable giving a fresh finite pass over the eval split (first `max_batches` batches; 0 = all)."""
  if not eval_files:
    return None
  loader = make(eval_files, seed=0, train=False)
  return lambda: itertools.islice(iter(loader), max_batches or None)


def run_lm(cfg: ml_collections.ConfigDict, workdir: str, stage: str) -> dict:
  """Pretraining (`stage="pretrain"`, plain text) or SFT (`stage="sft"`, JSONL prompt/response) to completion."""
  if stage not in ("pretrain", "sft"):
    raise ValueError(f"run_lm stage={stage!r}; expected pretrain or sft")
  train_files = checked_files(cfg.data.train, "data.train")
  eval_files = checked_files(cfg.data.eval, "data.eval") if cfg.data.eval else None
  spec = lora.Spec.from_config(cfg.lora)
  mesh = stage_mesh(cfg, workdir)
  init = resolve_init(cfg, workdir, train_files)
  check_init_model(init, mesh, cfg.train.init_from)
  if cfg.data.seq_len > init.model.max_len:
    raise ValueError(f"config data.seq_len={cfg.data.seq_len} exceeds model.max_len={init.model.max_len}")
  lo = lora_run(cfg, workdir, init, spec)
  if stage == "pretrain":
    make = functools.partial(data.make_lm_loader, text_key=cfg.data.text_key)
  else:
    make = functools.partial(data.make_sft_loader, truncate_prompt=cfg.data.truncate)
  make = functools.partial(make, tokenizer=init.tokenizer, seq_len=cfg.data.seq_len,
                           batch_size=cfg.data.batch_size, workdir=workdir, **_hosts(mesh))
  train_loader = make(train_files, seed=cfg.data.seed)
  eval_fn = _eval_fn(make, eval_files, cfg.train.eval_batches)
  install_tokenizer(init.tokenizer, workdir)
  tx = optimizer.make_optimizer(cfg.opt, cfg.train.num_steps // cfg.opt.grad_accum)
  model = init.model
  loss_fn = functools.partial(losses.lm_loss, cfg=model)
  scratch = lambda: trainer.create_state(init_params(model, jax.random.PRNGKey(cfg.train.seed)), tx, cfg.train.seed)
  init_fn, meta = checked_params_fn(init, cfg.train.init_from), {"stage": stage, "model": dataclasses.asdict(model)}
  specs, frozen_specs = logical_axes(lambda: boxed_params(model, jax.random.PRNGKey(0))), None
  if lo is not None:  # LoRA: the adapters train, the base is a frozen argument of every step
    loss_fn, init_fn, meta = lora.with_base(loss_fn, lo.spec), None, {**meta, **lo.meta}
    scratch = lambda: trainer.create_state(lora.split(lo.base, lo.spec, jax.random.PRNGKey(cfg.train.seed))[0], tx,
                                           cfg.train.seed)
    specs, frozen_specs = lora_axes(lo, model)
  _, last = trainer.train_loop(
      workdir=workdir, train_cfg=cfg.train, loss_fn=loss_fn, scratch_state=scratch, train_loader=train_loader,
      eval_batches=eval_fn, init_from_params=init_fn, meta=meta, stage=stage, mesh=mesh, param_specs=specs,
      frozen=lo.base if lo is not None else None, frozen_specs=frozen_specs)
  return last


def reward_data_config(seq_len: int = 128, batch_size: int = 16) -> ml_collections.ConfigDict:
  """The `cfg.data` group of the reward model."""
  d = lm_data_config(seq_len, batch_size)
  d.train = ""  # comparisons JSONL: {"prompt", "responses": [...], "ranking": [...]} or {"prompt","chosen","rejected"}
  d.eval = ""  # held-out comparisons (pairwise accuracy)
  d.max_responses = 4  # Kmax: responses per prompt in one batch element (records with more are an error)
  d.normalize_on = ""  # demonstrations JSONL: shift scores so these average 0 (InstructGPT); "" = off
  return d


NORM_FILE = "reward_offset.json"


def lm_config(stage: str) -> ml_collections.ConfigDict:
  """The whole config of the pretraining (`stage="pretrain"`) or SFT (`stage="sft"`) experiment."""
  cfg = ml_collections.ConfigDict()
  cfg.model = model_config()
  cfg.tokenizer = tokenizer_config()
  cfg.data = lm_data_config(seq_len=128, batch_size=16)
  cfg.opt = optimizer.default_config(lr=1e-3 if stage == "pretrain" else 5e-4)
  if stage == "sft":
    cfg.opt.warmup_steps = 10
  cfg.train = trainer.train_config(num_steps=400 if stage == "pretrain" else 200)
  cfg.lora = lora.config()
  cfg.mesh = parallel.mesh_config()
  return cfg


def reward_config() -> ml_collections.ConfigDict:
  """The whole config of the reward-model experiment."""
  cfg = ml_collections.ConfigDict()
  cfg.model = model_config()
  cfg.tokenizer = tokenizer_config()
  cfg.data = reward_data_config(seq_len=128, batch_size=8)
  cfg.opt = optimizer.default_config(lr=3e-4)
  cfg.opt.warmup_steps = 10
  cfg.train = trainer.train_config(num_steps=200)
  cfg.loss = ml_collections.ConfigDict()
  cfg.loss.lm_coef = 0.0  # + this × next-token loss on each record's best response (0: InstructGPT's RM loss)
  cfg.loss.loglik_feature = False  # score += a · log π_backbone(response | prompt), a learned (from 0)
  cfg.loss.token_head = False  # score += Σ_t u(h_t) over the response tokens, u a second scalar head (from 0)
  cfg.lora = lora.config()
  cfg.mesh = parallel.mesh_config()
  return cfg


def fresh_reward_params(model: TransformerConfig, rng: jax.Array, backbone=None, loglik: bool = False,
                        token_head: bool = False, boxed: bool = False) -> dict:
  """{"backbone", "head"}: the given (or random) Transformer params plus a new ScalarHead; + "loglik" (the
  likelihood feature's weight, 0) and "token_head" (a zero ScalarHead for per-token rewards) when asked; see
  `losses.packed_scores`. `boxed=True`: random params boxed with their logical axis names (for reward_axes)."""
  import flax.linen as nn
  import jax.numpy as jnp
  k1, k2 = jax.random.split(rng)
  head = boxed_head_params(model, k2) if boxed else nn.unbox(boxed_head_params(model, k2))
  if backbone is None:
    backbone = boxed_params(model, k1) if boxed else init_params(model, k1)
  params = {"backbone": backbone, "head": head}
  if loglik:
    params["loglik"] = jnp.zeros((), jnp.float32)
  if token_head:
    params["token_head"] = jax.tree.map(jnp.zeros_like, head)
  return params


def reward_axes(model: TransformerConfig, params_like: dict | None = None, loglik: bool = False,
                token_head: bool = False) -> dict:
  """Logical PartitionSpecs of an RM tree {"backbone", "head", ["loglik"], ["token_head"]} (the optional groups
  those of `params_like` when given), from abstract shapes."""
  if params_like is not None:
    loglik, token_head = "loglik" in params_like, "token_head" in params_like
  return logical_axes(lambda: fresh_reward_params(model, jax.random.PRNGKey(0), loglik=loglik,
                                                  token_head=token_head, boxed=True))


def run_reward(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Reward model: SFT backbone + ScalarHead trained with Bradley–Terry on ranked comparisons."""
  train_files = checked_files(cfg.data.train, "data.train")
  eval_files = checked_files(cfg.data.eval, "data.eval") if cfg.data.eval else None
  norm_files = checked_files(cfg.data.normalize_on, "data.normalize_on") if cfg.data.normalize_on else None
  spec = lora.Spec.from_config(cfg.lora)
  mesh = stage_mesh(cfg, workdir)
  init = resolve_init(cfg, workdir, train_files)
  check_init_model(init, mesh, cfg.train.init_from)
  model = init.model
  if cfg.data.seq_len > model.max_len:
    raise ValueError(f"config data.seq_len={cfg.data.seq_len} exceeds model.max_len={model.max_len}")
  if cfg.loss.lm_coef < 0:
    raise ValueError(f"config loss.lm_coef={cfg.loss.lm_coef} must be >= 0")
  lo = lora_run(cfg, workdir, init, spec)
  make = functools.partial(data.make_comparison_loader, tokenizer=init.tokenizer, seq_len=cfg.data.seq_len,
                           batch_size=cfg.data.batch_size, max_responses=cfg.data.max_responses,
                           truncate_prompt=cfg.data.truncate, workdir=workdir, **_hosts(mesh))
  train_loader = make(train_files, seed=cfg.data.seed)
  eval_fn = _eval_fn(make, eval_files, cfg.train.eval_batches)
  install_tokenizer(init.tokenizer, workdir)
  tx = optimizer.make_optimizer(cfg.opt, cfg.train.num_steps // cfg.opt.grad_accum)
  fresh = lambda backbone=None: fresh_reward_params(model, jax.random.PRNGKey(cfg.train.seed), backbone=backbone,
                                                   loglik=bool(cfg.loss.loglik_feature),
                                                   token_head=bool(cfg.loss.token_head))
  scratch = lambda: trainer.create_state(fresh(), tx, cfg.train.seed)
  backbone_fn = checked_params_fn(init, cfg.train.init_from)
  init_fn = None
  if backbone_fn is not None:
    init_fn = lambda fresh: dict(fresh, backbone=backbone_fn(fresh["backbone"]))
  loss_fn = functools.partial(losses.reward_loss, cfg=model, lm_coef=float(cfg.loss.lm_coef))
  meta = {"stage": "reward", "model": dataclasses.asdict(model)}
  specs = reward_axes(model, loglik=bool(cfg.loss.loglik_feature), token_head=bool(cfg.loss.token_head))
  frozen_specs = None
  if lo is not None:  # LoRA: adapters + the heads train on the frozen SFT backbone
    loss_fn, init_fn, meta = lora.with_base(loss_fn, lo.spec, "backbone"), None, {**meta, **lo.meta}
    scratch = lambda: trainer.create_state(lora.split(fresh(lo.base), lo.spec, jax.random.PRNGKey(cfg.train.seed),
                                                      "backbone")[0], tx, cfg.train.seed)
    specs, frozen_specs = lora_axes(lo, model, specs)
  state, last = trainer.train_loop(
      workdir=workdir, train_cfg=cfg.train, loss_fn=loss_fn, scratch_state=scratch, train_loader=train_loader,
      eval_batches=eval_fn, init_from_params=init_fn, meta=meta, stage="reward", mesh=mesh, param_specs=specs,
      frozen=lo.base if lo is not None else None, frozen_specs=frozen_specs)
  if norm_files:
    params = parallel.to_host(state.params)  # every process takes part (a gather where fsdp spans hosts)
    if jax.process_index() == 0:
      params = params if lo is None else lora.join(params, lo.base, lo.spec, "backbone", merged=True)
      _write_offset(workdir, params, model, init.tokenizer, norm_files, cfg.data.seq_len)
  return last


_packed_scores = jax.jit(losses.packed_scores, static_argnames=("cfg",))  # compiled once per model and shape


def score_texts(reward_params, model: TransformerConfig, tok: Tokenizer, prompts: list[str], responses: list[str],
                seq_len: int, batch_size: int = 32) -> np.ndarray:
  """RM scores of (prompt, response) pairs (prompt cut from the left to fit seq_len), without any offset."""
  out = []
  for lo in range(0, len(prompts), batch_size):
    rows = [data.pack_comparisons(data.comparison_pieces(
        {"prompt": p, "responses": [r], "ranking": [0], "origin": f"pair {lo + i}"}, tok, seq_len, 1, truncate=True),
        seq_len, 1, 1, tok.pad_id) for i, (p, r) in enumerate(zip(prompts[lo:lo + batch_size],
                                                                   responses[lo:lo + batch_size]))]
    pad = batch_size - len(rows)  # static shapes: one compilation
    rows += [rows[0]] * pad
    b = {k: np.stack([r[k] for r in rows]) for k in ("tokens", "positions", "segment_ids", "last_idx",
                                                     "response_idx")}
    s = _packed_scores(reward_params, b["tokens"], b["positions"], b["segment_ids"], b["last_idx"][:, 0],
                       b["response_idx"], cfg=model)
    out.append(np.asarray(s)[:len(rows) - pad, 0])
  return np.concatenate(out) if out else np.zeros(0, np.float32)


def _write_offset(workdir: str, params, model: TransformerConfig, tok: Tokenizer, files: list[str],
                  seq_len: int) -> float:
  """Writes the mean RM score of the demonstrations in `files` (subtracted from scores in RL) to NORM_FILE."""
  records = [r for f in files for r in data.read_jsonl(f, "sft")]
  scores = score_texts(params, model, tok, [r["prompt"] for r in records], [r["response"] for r in records],
                       seq_len)
  offset = float(np.mean(scores))
  with open(os.path.join(workdir, NORM_FILE), "w") as f:
    json.dump({"offset": offset, "num_demonstrations": len(records), "files": files}, f)
  logging.info("reward offset %.4f over %d demonstrations", offset, len(records))
  return offset


def load_reward_model(workdir: str) -> tuple[TransformerConfig, Any, float]:
  """(model config, {"backbone", "head"} params, score offset (0 when not normalised)) of an RM workdir."""
  meta = _source_meta(workdir)
  if meta.get("stage") != "reward":
    raise ValueError(f"config ppo.reward_from={workdir!r} is not a reward-model workdir (its checkpoint says "
                     f"stage={meta.get('stage')!r})")
  params = unfold(checkpoint.load_params(workdir)[0], meta, "backbone")
  offset = 0.0
  norm = os.path.join(workdir, NORM_FILE)
  if os.path.exists(norm):
    with open(norm) as f:
      offset = float(json.load(f)["offset"])
  return TransformerConfig.from_dict(meta["model"]), params, offset


def load_policy(workdir: str, field: str = "train.init_from") -> tuple[TransformerConfig, Any, Tokenizer]:
  """(model config, Transformer params, tokenizer) of a pretraining/SFT/PPO/DPO workdir (or hf:DIR / gguf:FILE)."""
  if workdir.startswith(EXTERNAL):
    return load_external(workdir)
  meta = _source_meta(workdir)
  if meta.get("stage") not in ("pretrain", "sft", "ppo", "dpo"):
    raise ValueError(f"config {field}={workdir!r} is a {meta.get('stage')!r} workdir, not a policy; give a "
                     f"pretraining or SFT workdir")
  params, _ = checkpoint.load_params(workdir)
  if meta.get("stage") in ("ppo", "dpo"):
    params = params["policy"]
  params = unfold(params, meta)
  return TransformerConfig.from_dict(meta["model"]), params, load_tokenizer(workdir)
