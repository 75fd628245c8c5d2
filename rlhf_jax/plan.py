"""Memory planner: lowers and compiles a stage's compiled functions for N devices from abstract shapes only
(jax.eval_shape: no weights allocated; `hf:DIR` reads only DIR/config.json) and reports, per function, the
per-device argument / output / temp bytes of `compiled.memory_analysis()`, and whether the peak fits.

peak per device = max over the stage's functions of (arguments + outputs - aliased (donated) + temps): every
function's arguments include the state that lives through the stage (parameters, optimizer moments, frozen
networks), so the largest one bounds what a device holds at once.

ADAPTER (until the `shard` branch's jit-over-a-mesh API is merged): today's step functions are per-device
functions with collectives over `parallel.AXIS`; `_global` runs one as the global function under jit by
vmapping it over a leading axis of size 1 named `parallel.AXIS` (the collectives become identities), and the
parameters / batch get NamedShardings from the logical axis names (model.py) through `RULES` (a copy of shard's
table). After the merge, `_lm_functions` / `_ppo_functions` take the stages' own jitted functions and shardings.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import losses, model, optimizer, parallel, ppo, sampling, trainer
from rlhf_jax.model import TransformerConfig

GIB = 1024 ** 3
PRESETS = {
    "tiny": TransformerConfig(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128, num_layers=2,
                              max_len=128, family="llama", tie_embeddings=False),
    "gpt2-124m": TransformerConfig(vocab_size=50257, d_model=768, num_heads=12, num_kv_heads=12, d_ff=3072,
                                   num_layers=12, max_len=1024, family="gpt2"),
    "smollm2-135m": TransformerConfig(vocab_size=49152, d_model=576, num_heads=9, num_kv_heads=3, d_ff=1536,
                                      num_layers=30, max_len=2048, family="llama", rope_theta=100000.0),
    "llama3-8b": TransformerConfig(vocab_size=128256, d_model=4096, num_heads=32, num_kv_heads=8, d_ff=14336,
                                   num_layers=32, max_len=8192, family="llama", tie_embeddings=False,
                                   rope_theta=500000.0, norm_eps=1e-5),
}
RULES = (("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
         ("head_dim", None), ("positions", None), ("norm", None), ("scalar", None), ("layers", None))
BATCH = ("data", "fsdp")  # the mesh axes a batch's rows are split over


def model_config(spec: str, overrides: dict | None = None) -> TransformerConfig:
  """A preset name or `hf:DIR` (only DIR/config.json is read), with TransformerConfig field overrides."""
  if spec.startswith("hf:"):
    from rlhf_jax import hf_import
    path = os.path.join(spec[3:], hf_import.CONFIG_FILE)
    if not os.path.isfile(path):
      raise ValueError(f"--model={spec!r}: {path} does not exist")
    with open(path) as f:
      cfg = hf_import.config_from_hf(json.load(f), path)
  elif spec in PRESETS:
    cfg = PRESETS[spec]
  else:
    raise ValueError(f"--model={spec!r}: expected one of {sorted(PRESETS)} or hf:/dir/with/config.json")
  return dataclasses.replace(cfg, **(overrides or {}))


def make_mesh(devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
  """A (data, fsdp, tensor) mesh over the first `devices` devices; data=-1 takes what the others leave."""
  if data == -1:
    data = devices // (fsdp * tensor) if devices % (fsdp * tensor) == 0 else 0
  if data <= 0 or data * fsdp * tensor != devices or devices > jax.device_count():
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} must multiply to --devices={devices} "
                     f"(<= the {jax.device_count()} simulated devices)")
  return Mesh(np.array(jax.devices()[:devices]).reshape(data, fsdp, tensor), ("data", "fsdp", "tensor"))


def _spec(mesh: Mesh, logical: PartitionSpec, shape) -> PartitionSpec:
  """Mesh spec of one parameter (leading vmap axis unsharded); a dimension its mesh axis does not divide stays
  whole (replicated) rather than failing the plan."""
  table = dict(RULES)
  out = []
  for name, dim in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
    axis = table.get(name)
    out.append(axis if axis and dim % mesh.shape[axis] == 0 else None)
  return PartitionSpec(None, *out)


def _abstract(mesh: Mesh, shapes, logical=None, batch: bool = False):
  """ShapeDtypeStructs with a leading axis of 1 (the vmap adapter) and their NamedShardings: parameters by
  logical names, batches split over BATCH on their first axis, anything else replicated."""
  def one(x, spec):
    shape = (1,) + tuple(x.shape)
    if batch and x.ndim:
      p = PartitionSpec(None, BATCH)
    elif spec is not None and x.ndim:
      p = _spec(mesh, spec, x.shape)
    else:
      p = PartitionSpec()
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=NamedSharding(mesh, p))
  if logical is None:
    return jax.tree.map(lambda x: one(x, None), shapes)
  return jax.tree.map(one, shapes, logical, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def _global(fn: Callable, donate: tuple = ()) -> Callable:
  """ADAPTER: a per-device step (collectives over parallel.AXIS) as one jitted global function."""
  return jax.jit(jax.vmap(fn, axis_name=parallel.AXIS), donate_argnums=donate)


def _logical_state(boxed_fn: Callable, make_state: Callable) -> Any:
  """Logical specs of a whole state built from boxed params (optax moments inherit the params' boxes)."""
  return nn.get_partition_spec(jax.eval_shape(lambda: make_state(boxed_fn())))


def _lm_functions(mesh, cfg: TransformerConfig, stage_cfg) -> list[tuple[str, Callable, tuple]]:
  """(name, jitted function, abstract arguments) of pretraining / SFT: train_step and eval_step."""
  tx = optimizer.make_optimizer(stage_cfg.opt, stage_cfg.train.num_steps)
  key = jax.random.PRNGKey(0)
  make = lambda params: trainer.create_state(params, tx, 0)
  shapes = jax.eval_shape(lambda: make(model.init_params(cfg, key)))
  state = _abstract(mesh, shapes, _logical_state(lambda: model.boxed_params(cfg, key), make))
  B, L = stage_cfg.data.batch_size, stage_cfg.data.seq_len
  ints = jax.ShapeDtypeStruct((B, L), jnp.int32)
  batch = _abstract(mesh, {k: ints for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")},
                    batch=True)
  loss_fn = functools.partial(losses.lm_loss, cfg=cfg)
  return [("train_step", _global(functools.partial(trainer.train_step, loss_fn=loss_fn), (0,)), (state, batch)),
          ("eval_step", _global(functools.partial(trainer.eval_step, loss_fn=loss_fn)), (state.params, batch))]


def _ppo_functions(mesh, cfg: TransformerConfig, stage_cfg) -> list[tuple[str, Callable, tuple]]:
  """The PPO iteration's sampler, score_rollout and ppo_update (with the ptx batch when ppo.ptx_coef > 0), all
  four networks (value and RM: the policy's shape + a ScalarHead)."""
  c, hyper, key = stage_cfg, ppo.Hyper.from_config(stage_cfg.ppo), jax.random.PRNGKey(0)
  models = ppo.Models(cfg, cfg, cfg)
  tx = optimizer.make_optimizer(c.opt, c.train.num_steps * hyper.ppo_epochs * hyper.minibatches)
  scored = lambda p, h: {"backbone": p, "head": h}
  boxed_rm = lambda: scored(model.boxed_params(cfg, key), model.boxed_head_params(cfg, key))
  make = lambda pv: ppo.PPOState(jnp.int32(0), ppo.Trainable(*pv), tx.init(ppo.Trainable(*pv)), key)
  plain = lambda: (model.init_params(cfg, key), scored(model.init_params(cfg, key), nn.unbox(
      model.boxed_head_params(cfg, key))))
  state = _abstract(mesh, jax.eval_shape(lambda: make(plain())),
                    _logical_state(lambda: (model.boxed_params(cfg, key), boxed_rm()), make))
  frozen_shapes = jax.eval_shape(lambda: ppo.Frozen(*plain()))
  frozen = _abstract(mesh, frozen_shapes, nn.get_partition_spec(jax.eval_shape(
      lambda: ppo.Frozen(model.boxed_params(cfg, key), boxed_rm()))))
  B, P = c.ppo.rollout_batch, c.data.prompt_len
  prompts = _abstract(mesh, {"t": jax.ShapeDtypeStruct((B, P), jnp.int32)}, batch=True)["t"]
  scalar = _abstract(mesh, jax.ShapeDtypeStruct((), jnp.float32))
  rng = _abstract(mesh, jax.ShapeDtypeStruct((2,), jnp.uint32))
  sampler = sampling.make_sampler(_global, cfg, max_new_tokens=c.ppo.max_new_tokens, temperature=c.ppo.temperature,
                                  eos_id=1, pad_id=0)
  samples = _abstract(mesh, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), jax.eval_shape(
      sampler, state.params.policy, prompts, prompts, rng)), batch=True)
  score = _global(functools.partial(ppo.score_rollout, models=models, ppo=hyper))
  rollout = jax.eval_shape(score, state.params, frozen, samples, scalar, scalar)[0]
  rollout = _abstract(mesh, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), rollout), batch=True)
  ptx = None
  if hyper.ptx_coef > 0:  # the pretraining-mix batch of PPO-ptx
    ints = jax.ShapeDtypeStruct((c.data.ptx_batch_size, c.data.ptx_seq_len), jnp.int32)
    ptx = _abstract(mesh, {k: ints for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")},
                    batch=True)
  update = _global(functools.partial(ppo.ppo_update, tx=tx, models=models, ppo=hyper), (0,))
  return [("sampler", sampler, (state.params.policy, prompts, prompts, rng)),
          ("score_rollout", score, (state.params, frozen, samples, scalar, scalar)),
          ("ppo_update", update, (state, rollout, ptx))]


STAGES = {"pretrain": _lm_functions, "sft": _lm_functions, "ppo": _ppo_functions}


def plan(stage: str, cfg: TransformerConfig, stage_cfg, mesh: Mesh, device_memory_gib: float) -> list[str]:
  """Compiles every function of `stage` on `mesh`; returns the report lines (the last: the peak and the verdict)."""
  if stage not in STAGES:
    raise ValueError(f"--stage={stage!r}: expected one of {sorted(STAGES)} (reward: not yet planned)")
  lines = [f"{stage} on mesh {dict(mesh.shape)}: {cfg.family} D={cfg.d_model} layers={cfg.num_layers} "
           f"V={cfg.vocab_size} params {cfg.param_dtype}, compute {cfg.dtype}, scan_layers={cfg.scan_layers}, "
           f"remat={cfg.remat}"]
  peak = 0
  for name, fn, args in STAGES[stage](mesh, cfg, stage_cfg):
    t0 = time.perf_counter()
    m = fn.lower(*args).compile().memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    peak = max(peak, total)
    mib = lambda b: f"{b / 2 ** 20:10.1f} MiB"
    lines.append(f"  {name:14s} per device: arguments {mib(m.argument_size_in_bytes)}, outputs "
                 f"{mib(m.output_size_in_bytes)} (aliased {mib(m.alias_size_in_bytes).strip()}), temps "
                 f"{mib(m.temp_size_in_bytes)}; compile {time.perf_counter() - t0:.1f} s")
  verdict = "fits" if peak <= device_memory_gib * GIB else "does not fit"
  lines.append(f"peak per device: {peak / GIB:.2f} GiB of {device_memory_gib:g} GiB ({verdict})")
  return lines


MODEL_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention")  # --config.model.* the plan applies


def stage_config(stage: str):
  """The stage's own ConfigDict (its --config. flags) plus `mesh` (data/fsdp/tensor) and `model` run fields."""
  import ml_collections
  from rlhf_jax import stages
  if stage not in STAGES:
    raise ValueError(f"--stage={stage!r}: expected one of {sorted(STAGES)} (reward: not yet planned)")
  cfg = ppo.config() if stage == "ppo" else stages.lm_config(stage)
  if "mesh" not in cfg:
    cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  if "model" not in cfg:
    cfg.model = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32", scan_layers=False,
                                               remat="none", attention="auto"))
  return cfg


def run(stage: str, spec: str, devices: int, device_memory_gib: float, cfg) -> list[str]:
  """The planner's entry point: model from `spec` with cfg.model's run fields, the mesh of cfg.mesh, the plan."""
  m = model_config(spec, {f: cfg.model[f] for f in MODEL_FIELDS if f in cfg.model})
  mesh = make_mesh(devices, cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  return plan(stage, m, cfg, mesh, device_memory_gib)
