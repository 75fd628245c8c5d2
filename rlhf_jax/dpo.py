"""The DPO stage on the shared trainer: the DPO family (`losses.dpo_loss`) from the reward model's comparison JSONL.

Every record gives all C(K,2) ranked pairs (or its chosen/rejected pair); records are packed as the RM's batches are
(`data.make_comparison_loader`). The policy starts from `train.init_from` (an SFT workdir), which is also the
frozen reference π_ref. Sequence log-probs are sums over each response's tokens and eos. The reference's
log-probs are either computed once per record before training (`dpo.ref_logp="precompute"`: one forward pass
over the data, cached in workdir/ref_logp.npz and reused on resume) or in every step's loss
(`"on_the_fly"`: the reference rides in the parameters under stop_gradient, frozen by the optimizer; one more
forward per step, and its zero gradients are reduced with the policy's). Checkpoints say stage="dpo": the policy
is `params["policy"]` (`stages.load_policy`). With LoRA (`lora.rank` > 0) the policy is {"adapters"} on the
frozen SFT weights, and the reference is those weights with the adapters off: no second model.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import time

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from rlhf_jax import checkpoint, data, lora, losses, optimizer, parallel, records, stages, trainer
from rlhf_jax.model import boxed_params, logical_axes

REF_MODES = ("precompute", "on_the_fly")
CACHE_FILE = "ref_logp.npz"


def config() -> ml_collections.ConfigDict:
  """The whole config of the DPO experiment: comparisons, dpo knobs, optimizer, steps."""
  cfg = ml_collections.ConfigDict()
  cfg.data = stages.lm_data_config(seq_len=128, batch_size=8)
  cfg.data.train = ""  # comparisons JSONL: {"prompt", "responses", "ranking"} or {"prompt", "chosen", "rejected"}
  cfg.data.eval = ""  # held-out comparisons (eval_accuracy: implicit-reward pairwise accuracy)
  cfg.data.max_responses = 4  # Kmax: responses per prompt in one batch element
  cfg.dpo = ml_collections.ConfigDict()
  cfg.dpo.beta = 0.1  # β: inverse strength of the implicit KL to the reference
  cfg.dpo.loss_type = "sigmoid"  # sigmoid (DPO) | hinge | ipo | robust | simpo (reference-free)
  cfg.dpo.label_smoothing = 0.0  # ε: label-noise rate (sigmoid: cDPO, robust: rDPO, simpo); < 0.5
  cfg.dpo.simpo_gamma = 0.5  # SimPO's target margin γ
  cfg.dpo.ref_logp = "precompute"  # reference log-probs: precompute (once per record, cached) | on_the_fly
  cfg.opt = optimizer.default_config(lr=1e-4)
  cfg.opt.warmup_steps = 10
  cfg.train = trainer.train_config(num_steps=200)  # init_from: the SFT workdir (policy start and reference)
  cfg.lora = lora.config()  # rank > 0: adapters train on the frozen SFT weights, which are also the reference
  cfg.mesh = parallel.mesh_config()
  return cfg


def _validate(cfg) -> None:
  d = cfg.dpo
  if d.loss_type not in losses.DPO_LOSS_TYPES:
    raise ValueError(f"config dpo.loss_type={d.loss_type!r}; expected one of {losses.DPO_LOSS_TYPES}")
  if d.ref_logp not in REF_MODES:
    raise ValueError(f"config dpo.ref_logp={d.ref_logp!r}; expected one of {REF_MODES}")
  if not d.beta > 0:
    raise ValueError(f"config dpo.beta={d.beta} must be > 0")
  if not 0 <= d.label_smoothing < 0.5:
    raise ValueError(f"config dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
  if not cfg.train.init_from:
    raise ValueError("config train.init_from is empty: give the SFT workdir (policy start and reference)")


def _cache_key(cfg, files: list[str]) -> str:
  """What the cached reference log-probs depend on: the reference checkpoint, the data files, the packing."""
  stat = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
  return json.dumps({"ref": os.path.abspath(cfg.train.init_from),
                     "ref_step": checkpoint.Checkpointer(cfg.train.init_from, create=False).latest_step(),
                     "files": stat, "seq_len": cfg.data.seq_len, "max_responses": cfg.data.max_responses,
                     "truncate": bool(cfg.data.truncate), "batch_size": cfg.data.batch_size})


def reference_logps(ref_params, model, tok, files: list[str], cfg, workdir: str) -> dict[str, np.ndarray]:
  """{record origin: the reference's sequence log-prob of each response}, one unshuffled pass (one device)."""
  loader = data.make_comparison_loader(files, tok, cfg.data.seq_len, cfg.data.batch_size, cfg.data.max_responses,
                                       0, workdir, truncate_prompt=cfg.data.truncate, train=False,
                                       local_device_count=1)
  recs = records.Records(files, "comparison", workdir)
  fn = jax.jit(lambda p, b: losses.sequence_logps(p, b, model)[0])
  out, j = {}, 0
  for batch in loader:  # records in file order, packed in order: the j-th filled record slot is record j
    keys = ("tokens", "positions", "segment_ids", "response_idx", "rank")
    logp_BxRxK = np.asarray(fn(ref_params, {k: batch[k] for k in keys}))
    for b, r in itertools.product(*map(range, batch["valid"].shape[:2])):
      k = int(np.count_nonzero(batch["valid"][b, r]))
      if k:
        out[recs[j]["origin"]], j = logp_BxRxK[b, r, :k], j + 1
  if j != len(recs):
    raise RuntimeError(f"reference pass saw {j} records of {len(recs)}")
  return out


def cached_reference_logps(ref_params, model, tok, files: list[str], cfg, workdir: str) -> dict[str, np.ndarray]:
  """`reference_logps`, reused from workdir/ref_logp.npz when computed for the same reference, data and packing."""
  path, key = os.path.join(workdir, CACHE_FILE), _cache_key(cfg, files)
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as z:
      if str(z["key"]) == key:
        ends = np.cumsum(z["counts"])
        return {o: z["values"][e - n:e] for o, n, e in zip(z["origins"].tolist(), z["counts"], ends)}
    logging.info("dpo: %s was computed for other inputs; recomputing", path)
  t0 = time.perf_counter()
  out = reference_logps(ref_params, model, tok, files, cfg, workdir)
  logging.info("dpo: reference log-probs of %d records in %.1fs", len(out), time.perf_counter() - t0)
  if jax.process_index() == 0:
    tmp = path + ".tmp.npz"
    np.savez(tmp, key=np.array(key), origins=np.array(list(out)), counts=np.array([len(v) for v in out.values()]),
             values=np.concatenate(list(out.values())).astype(np.float32))
    os.replace(tmp, path)
  return out


def _optimizer(cfg, on_the_fly: bool) -> optax.GradientTransformation:
  """The configured optimizer on the policy; with the reference in the params, nothing ever moves it."""
  tx = optimizer.make_optimizer(cfg.opt, cfg.train.num_steps // cfg.opt.grad_accum)
  if not on_the_fly:
    return tx
  labels = lambda params: {k: jax.tree.map(lambda _: "frozen" if k == "ref" else "train", v)
                           for k, v in params.items()}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def run_dpo(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """DPO (or a variant) from an SFT workdir on ranked comparisons, to completion; auto-resumes."""
  _validate(cfg)
  spec = lora.Spec.from_config(cfg.lora)
  if checkpoint.has_checkpoint(workdir):
    lora.check_resume(checkpoint.load_extra(workdir).get("meta", {}).get("lora"), spec, workdir)
  train_files = stages.checked_files(cfg.data.train, "data.train")
  eval_files = stages.checked_files(cfg.data.eval, "data.eval") if cfg.data.eval else None
  mesh = parallel.make_mesh(cfg.mesh)
  model, sft_params, tok = stages.load_policy(cfg.train.init_from)
  parallel.check_model(model, mesh, f"the policy of train.init_from={cfg.train.init_from!r}: model")
  if cfg.data.seq_len > model.max_len:
    raise ValueError(f"config data.seq_len={cfg.data.seq_len} exceeds the policy's max_len={model.max_len}")
  stages.install_tokenizer(tok, workdir)
  on_the_fly = cfg.dpo.ref_logp == "on_the_fly"
  record_values = None
  if not on_the_fly:
    if isinstance(train_files, str) or isinstance(eval_files, str):
      raise ValueError("config dpo.ref_logp='precompute' needs local comparison files: use 'on_the_fly' with tfds:")
    ref = cached_reference_logps(sft_params, model, tok, train_files + (eval_files or []), cfg, workdir)
    record_values = lambda r: {"ref_logp": ref[r["origin"]]}
  make = functools.partial(data.make_comparison_loader, tokenizer=tok, seq_len=cfg.data.seq_len,
                           batch_size=cfg.data.batch_size, max_responses=cfg.data.max_responses,
                           truncate_prompt=cfg.data.truncate, workdir=workdir, record_values=record_values,
                           **stages.loader_hosts(mesh))
  train_loader = make(train_files, seed=cfg.data.seed)
  eval_fn = None
  if eval_files:
    eval_loader = make(eval_files, seed=0, train=False)
    eval_fn = lambda: itertools.islice(iter(eval_loader), cfg.train.eval_batches or None)
  tx = _optimizer(cfg, on_the_fly)
  params = {"policy": sft_params, **({"ref": sft_params} if on_the_fly else {})}
  d = cfg.dpo
  loss_fn = functools.partial(losses.dpo_pair_loss, cfg=model, beta=float(d.beta), loss_type=d.loss_type,
                              label_smoothing=float(d.label_smoothing), simpo_gamma=float(d.simpo_gamma))
  meta = {"stage": "dpo", "model": dataclasses.asdict(model), "sft": cfg.train.init_from, "dpo": cfg.dpo.to_dict()}
  frozen, policy_axes = None, logical_axes(lambda: boxed_params(model, jax.random.PRNGKey(0)))
  specs = {"policy": policy_axes, **({"ref": policy_axes} if on_the_fly else {})}
  if spec.enabled:  # adapters on the frozen SFT weights; the reference is those weights themselves
    frozen = lora.cast_base(sft_params, cfg.lora.base_dtype)
    tx = optimizer.make_optimizer(cfg.opt, cfg.train.num_steps // cfg.opt.grad_accum)
    params = {"policy": lora.split(frozen, spec, jax.random.PRNGKey(cfg.train.seed))[0]}
    loss_fn = _lora_loss(loss_fn, spec, on_the_fly)
    meta.update(lora={**spec.meta(), "base_dtype": cfg.lora.base_dtype}, lora_base=cfg.train.init_from)
    specs = {"policy": lora.trainable_axes(policy_axes, params["policy"]["adapters"], spec)}
  _, last = trainer.train_loop(
      workdir=workdir, train_cfg=cfg.train, loss_fn=loss_fn,
      scratch_state=lambda: trainer.create_state(params, tx, cfg.train.seed), train_loader=train_loader,
      eval_batches=eval_fn, meta=meta, stage="dpo", mesh=mesh, param_specs=specs, frozen=frozen,
      frozen_specs=policy_axes if frozen is not None else None)
  return last


def _lora_loss(loss_fn, spec: lora.Spec, on_the_fly: bool):
  """The DPO loss on {"policy": the base with its adapters} (+ "ref": the base itself, on the fly) from the trainable
  {"policy": {"adapters"}} and the frozen base."""
  def fn(trainable, batch, rng, base):
    params = {"policy": lora.join(trainable["policy"], base, spec), **({"ref": base} if on_the_fly else {})}
    return loss_fn(params, batch, rng)
  return fn
