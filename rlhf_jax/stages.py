"""The supervised stages on the shared trainer: pretraining and SFT (next-token loss), and the reward model.

Each `run_*(cfg, workdir)` validates its inputs before writing anything, resolves the model and tokenizer
(resume > `train.init_from` > scratch: sources.py), builds the loaders and calls `trainer.train_loop`. The reward
model's params, score offset and loader live here too; what a stage starts from lives in sources.py.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import checkpoint, data, lora, losses, optimizer, parallel, trainer
from rlhf_jax.model import TransformerConfig, boxed_head_params, boxed_params, init_params, logical_axes
from rlhf_jax.sources import (  # noqa: F401 (re-exported: stages.load_policy etc. are called across the package)
    EXTERNAL, RUNTIME_FIELDS, TOKENIZER_FILE, Init, LoraRun, base_params, check_init_model, checked_files,
    checked_params_fn, chat_tokenizer, install_tokenizer, load_external, load_policy, lora_axes, lora_run,
    model_config, resolve_init, source_meta, tokenizer_config, unfold)
from rlhf_jax.tokenizer import BaseTokenizer as Tokenizer


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


def loader_hosts(mesh=None) -> dict:
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
                           batch_size=cfg.data.batch_size, workdir=workdir, **loader_hosts(mesh))
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
                           truncate_prompt=cfg.data.truncate, workdir=workdir, **loader_hosts(mesh))
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
  meta = source_meta(workdir)
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


