"""optax chain from config: learning-rate schedule, global-norm clipping, AdamW, gradient accumulation."""
from __future__ import annotations

import jax
import ml_collections
import optax

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warm-up to `opt.lr` over `opt.warmup_steps`, then constant, cosine or linear decay to 0."""
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"config opt.schedule={opt.schedule!r}; expected one of {SCHEDULES}")
  warmup = int(opt.warmup_steps)
  if opt.schedule == "constant":
    return optax.warmup_constant_schedule(0.0, opt.lr, max(warmup, 1)) if warmup else optax.constant_schedule(opt.lr)
  decay_steps = max(num_steps, warmup + 1)
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, opt.lr, warmup, decay_steps, end_value=0.0)
  return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, max(warmup, 1)),
                               optax.linear_schedule(opt.lr, 0.0, decay_steps - warmup)], [warmup])


def _decay_mask(params):
  """Weight decay on matrices only (kernels and embeddings of rank >= 2), not on biases and norm scales; under a
  scanned `layers` subtree the leading layers axis does not count."""
  def is_matrix(path, x):
    stacked = any(getattr(k, "key", None) == "layers" for k in path)
    return x.ndim - stacked >= 2
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> adamw(schedule), wrapped in optax.MultiSteps when opt.grad_accum > 1.

  `num_steps` counts optimizer updates; with accumulation each update consumes `grad_accum` micro-batches.
  """
  if opt.grad_accum < 1:
    raise ValueError(f"config opt.grad_accum={opt.grad_accum} must be >= 1")
  tx = optax.chain(
      optax.clip_by_global_norm(opt.clip_norm) if opt.clip_norm > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(opt, num_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=_decay_mask),
  )
  if opt.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=opt.grad_accum)
  return tx


def default_config(lr: float = 3e-4) -> ml_collections.ConfigDict:
  """The `cfg.opt` group shared by every stage's config."""
  opt = ml_collections.ConfigDict()
  opt.lr = lr  # peak learning rate
  opt.schedule = "cosine"  # constant | cosine | linear (decay to 0 after warm-up)
  opt.warmup_steps = 20  # linear warm-up from 0
  opt.b1 = 0.9  # AdamW beta1
  opt.b2 = 0.95  # AdamW beta2
  opt.eps = 1e-8  # AdamW epsilon
  opt.weight_decay = 0.1  # decoupled weight decay on matrices
  opt.clip_norm = 1.0  # global-norm gradient clipping (0 = off)
  opt.grad_accum = 1  # micro-batches per optimizer update (optax.MultiSteps)
  return opt
