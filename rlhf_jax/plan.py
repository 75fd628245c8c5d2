"""Memory planner: lowers and compiles a stage's compiled functions for N devices from abstract shapes only
(jax.eval_shape: no weights allocated; `hf:DIR` reads only DIR/config.json) and reports, per function, the
per-device argument / output / temp bytes of `compiled.memory_analysis()`, and whether the peak fits.

peak per device = max over the stage's functions of (arguments + outputs - aliased (donated) + temps): every
function's arguments include the state that lives through the stage (parameters, optimizer moments, frozen
networks), so the largest one bounds what a device holds at once.

The functions are the stages' own, compiled over the mesh by the same calls the stages make
(trainer.compile_steps, ppo.compile_steps, sampling.make_sampler), with the shardings of parallel.py's rule table;
only their arguments are abstract (ShapeDtypeStructs carrying those shardings).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp

from rlhf_jax import lora, losses, model, optimizer, parallel, ppo, sampling, trainer
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


def _batch(mesh, shapes: dict) -> dict:
  """Abstract batch arrays (ShapeDtypeStructs) split over the batch shards ("data", "fsdp")."""
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh))
          for k, (shape, dtype) in shapes.items()}


def _lm_batch(mesh, B: int, L: int) -> dict:
  return _batch(mesh, {k: ((B, L), jnp.float32 if k == "loss_mask" else jnp.int32)
                       for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")})


def _placed(abstract, shardings):
  return parallel.with_shardings(abstract, shardings)


def _supervised(mesh, trainable_fn: Callable, specs, loss_fn, stage_cfg, batch: dict, base=None, base_specs=None):
  """(name, jitted, abstract args) of a supervised stage's train_step and eval_step (trainer.compile_steps), the
  state built from `trainable_fn` (abstract), a frozen LoRA base if given."""
  tx = optimizer.make_optimizer(stage_cfg.opt, stage_cfg.train.num_steps)
  abstract = jax.eval_shape(lambda: trainer.create_state(trainable_fn(), tx, 0))
  state_sh = parallel.state_shardings(mesh, abstract, specs)
  base_sh = None if base is None else parallel.param_shardings(mesh, base, base_specs)
  p_train, p_eval = trainer.compile_steps(loss_fn, mesh, state_sh, base_sh)
  state, frozen = _placed(abstract, state_sh), () if base is None else (_placed(base, base_sh),)
  return [("train_step", p_train, (state, batch, *frozen)), ("eval_step", p_eval, (state.params, batch, *frozen))]


def _lora(stage_cfg):
  return lora.Spec.from_config(stage_cfg.lora) if "lora" in stage_cfg else lora.Spec()


def _lm_functions(mesh, cfg: TransformerConfig, stage_cfg) -> list[tuple[str, Callable, tuple]]:
  """Pretraining / SFT: train_step and eval_step (with `lora.rank` > 0: adapters on a frozen base)."""
  key, spec = jax.random.PRNGKey(0), _lora(stage_cfg)
  axes = model.logical_axes(lambda: model.boxed_params(cfg, key))
  params = jax.eval_shape(lambda: model.init_params(cfg, key))
  batch = _lm_batch(mesh, stage_cfg.data.batch_size, stage_cfg.data.seq_len)
  loss_fn = functools.partial(losses.lm_loss, cfg=cfg)
  if not spec.enabled:
    return _supervised(mesh, lambda: model.init_params(cfg, key), axes, loss_fn, stage_cfg, batch)
  trainable = lambda: lora.split(params, spec, key)[0]
  adapters = jax.eval_shape(trainable)
  specs = lora.trainable_axes(axes, adapters["adapters"], spec)
  return _supervised(mesh, trainable, specs, lora.with_base(loss_fn, spec), stage_cfg, batch, params, axes)


def _reward_functions(mesh, cfg: TransformerConfig, stage_cfg) -> list[tuple[str, Callable, tuple]]:
  """The reward model's train_step and eval_step: Bradley–Terry on batches of K responses × seq_len rows (one
  record per element), the backbone + a ScalarHead (LoRA: adapters + head on a frozen backbone)."""
  from rlhf_jax import stages
  key, spec, d = jax.random.PRNGKey(0), _lora(stage_cfg), stage_cfg.data
  B, K, L = d.batch_size, d.max_responses, d.seq_len
  i32 = jnp.int32
  batch = _batch(mesh, {"tokens": ((B, K, L), i32), "positions": ((B, K, L), i32), "segment_ids": ((B, K, L), i32),
                        "response_idx": ((B, K, L), i32), "last_idx": ((B, 1, K), i32), "rank": ((B, 1, K), i32),
                        "valid": ((B, 1, K), i32)})
  loss_fn = functools.partial(losses.reward_loss, cfg=cfg, lm_coef=float(stage_cfg.loss.lm_coef))
  fresh = lambda: stages.fresh_reward_params(cfg, key)
  specs = stages.reward_axes(cfg)
  if not spec.enabled:
    return _supervised(mesh, fresh, specs, loss_fn, stage_cfg, batch)
  full = jax.eval_shape(fresh)
  trainable = lambda: lora.split(full, spec, key, "backbone")[0]
  adapters = jax.eval_shape(trainable)
  specs = lora.trainable_axes(specs["backbone"], adapters["adapters"], spec, specs)
  return _supervised(mesh, trainable, specs, lora.with_base(loss_fn, spec, "backbone"), stage_cfg, batch,
                     full["backbone"], stages.reward_axes(cfg)["backbone"])


def _ppo_functions(mesh, cfg: TransformerConfig, stage_cfg) -> list[tuple[str, Callable, tuple]]:
  """The PPO iteration's sampler, score_rollout and ppo_update (with the ptx batch when ppo.ptx_coef > 0), all
  four networks (value and RM: the policy's shape + a ScalarHead; no value network for RLOO/GRPO), through
  ppo.compile_steps; `lora.rank` > 0: adapters for policy and value on the frozen reference / RM."""
  from rlhf_jax import stages
  c, hyper, key, spec = stage_cfg, ppo.Hyper.from_config(stage_cfg.ppo), jax.random.PRNGKey(0), _lora(stage_cfg)
  models = ppo.Models(cfg, cfg, cfg, spec, "reward")
  tx = optimizer.make_optimizer(c.opt, c.train.num_steps * hyper.ppo_epochs * hyper.minibatches)
  policy = jax.eval_shape(lambda: model.init_params(cfg, key))
  rm = jax.eval_shape(lambda: stages.fresh_reward_params(cfg, key))
  value = rm if hyper.critic else None

  def trainable():
    if not spec.enabled:
      return ppo.Trainable(policy=policy, value=value)
    return ppo.Trainable(policy=lora.split(policy, spec, key)[0],
                         value=None if value is None else lora.split(value, spec, key, "backbone")[0])

  abstract = jax.eval_shape(lambda: ppo.PPOState(jnp.int32(0), trainable(), tx.init(trainable()), key))
  trained_axes, frozen_axes = ppo.network_axes(models, rm, value, abstract.params)
  state_sh = parallel.state_shardings(mesh, abstract, trained_axes)
  frozen_abstract = ppo.Frozen(ref=policy, reward=rm)
  frozen = _placed(frozen_abstract, parallel.state_shardings(mesh, frozen_abstract, frozen_axes))
  state = _placed(abstract, state_sh)
  B, P = c.ppo.rollout_batch, c.data.prompt_len
  prompts = _batch(mesh, {"t": ((B, P), jnp.int32)})["t"]
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  rng = jax.eval_shape(lambda: key)
  sampler = sampling.make_sampler(mesh, cfg, max_new_tokens=c.ppo.max_new_tokens, temperature=c.ppo.temperature,
                                  eos_id=1, pad_id=0)
  p_score, p_update = ppo.compile_steps(mesh, state_sh, tx, models, hyper)
  sampled_policy = frozen.ref if spec.enabled else state.params.policy  # LoRA: the merged policy, the base's layout
  samples = jax.eval_shape(sampler, sampled_policy, prompts, prompts, rng)
  samples = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.batch_sharding(mesh)),
                         samples)
  rollout = jax.eval_shape(p_score, state.params, frozen, samples, scalar, scalar)[0]
  rollout = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.batch_sharding(mesh)),
                         rollout)
  ptx = _lm_batch(mesh, c.data.ptx_batch_size, c.data.ptx_seq_len) if hyper.ptx_coef > 0 else None
  lora_frozen = frozen if spec.enabled else None
  return [("sampler", sampler, (sampled_policy, prompts, prompts, rng)),
          ("score_rollout", p_score, (state.params, frozen, samples, scalar, scalar)),
          ("ppo_update", p_update, (state, rollout, ptx, scalar, lora_frozen))]


STAGES = {"pretrain": _lm_functions, "sft": _lm_functions, "reward": _reward_functions, "ppo": _ppo_functions}


def plan(stage: str, cfg: TransformerConfig, stage_cfg, mesh, device_memory_gib: float) -> list[str]:
  """Compiles every function of `stage` on `mesh`; returns the report lines (the last: the peak and the verdict)."""
  if stage not in STAGES:
    raise ValueError(f"--stage={stage!r}: expected one of {sorted(STAGES)}")
  lines = [f"{stage} on mesh {dict(mesh.shape)}: {cfg.family} D={cfg.d_model} layers={cfg.num_layers} "
           f"V={cfg.vocab_size} params {cfg.param_dtype}, compute {cfg.dtype}, scan_layers={cfg.scan_layers}, "
           f"remat={cfg.remat}" + (f", LoRA rank {stage_cfg.lora.rank}" if _lora(stage_cfg).enabled else "")]
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
    raise ValueError(f"--stage={stage!r}: expected one of {sorted(STAGES)}")
  cfg = {"ppo": ppo.config, "reward": stages.reward_config}.get(stage, lambda: stages.lm_config(stage))()
  if "model" not in cfg:
    cfg.model = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32", scan_layers=False,
                                               remat="none", attention="auto"))
  return cfg


def run(stage: str, spec: str, devices: int, device_memory_gib: float, cfg) -> list[str]:
  """The planner's entry point: model from `spec` with cfg.model's run fields, the mesh of cfg.mesh, the plan."""
  m = model_config(spec, {f: cfg.model[f] for f in MODEL_FIELDS if f in cfg.model})
  if devices > jax.device_count():
    raise ValueError(f"--devices={devices} exceeds the {jax.device_count()} simulated devices")
  mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:devices])
  parallel.check_model(m, mesh, f"--model={spec!r}:")
  return plan(stage, m, cfg, mesh, device_memory_gib)
