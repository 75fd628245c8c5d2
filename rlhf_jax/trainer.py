"""TrainState, the generic `train_step`, and the `train_loop` shared by pretraining, SFT and the RM.

Loss contract: `loss_fn(params, batch, rng) -> (loss_sum, aux)` where `aux` maps metric names to
`(sum, count)` pairs and `aux["loss"] == (loss_sum, count)`. The step is written for the global batch (compiled
over the device mesh by parallel.jit): the gradient of the sum divided by the global count is the gradient of the
global mean loss whatever the padding per shard, and the metrics are exact global sums.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from rlhf_jax import checkpoint, metrics, parallel

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


class TrainState(train_state.TrainState):
  """flax TrainState plus the base RNG key every step folds its step number into."""
  rng: jax.Array


def create_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh TrainState (step 0) for `params` and optimizer `tx`."""
  return TrainState.create(apply_fn=None, params=params, tx=tx, rng=jax.random.PRNGKey(seed))


def step_rng(state: TrainState) -> jax.Array:
  """This step's key: fold_in(fold_in(rng, step), 0), the key device 0 drew under the former per-device pmap (so
  one-device runs draw as before) and now the key of the whole global batch, whatever the mesh."""
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)


def mean_grads(loss_fn: LossFn, params, batch, rng):
  """(aux, grads of the global mean loss): value_and_grad of the summed loss over the global batch, divided by the
  global count (GSPMD sums the per-shard gradients), in each parameter's dtype (a float32 count would promote
  bfloat16 gradients, and with them Adam's moments, to float32)."""
  (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
  count = jnp.asarray(aux["loss"][1], jnp.float32)
  return aux, jax.tree.map(lambda g: (g / jnp.maximum(count, 1e-9)).astype(g.dtype), grads)


def _bind(loss_fn, frozen):
  """The loss with the frozen (never differentiated) params bound: LoRA's base, `loss_fn(params, batch, rng, frozen)`."""
  return loss_fn if frozen is None else (lambda params, batch, rng: loss_fn(params, batch, rng, frozen))


def train_step(state: TrainState, batch: dict, frozen=None, *, loss_fn: LossFn) -> tuple[TrainState, dict]:
  """One optimizer update on the global batch (compiled over the mesh by `parallel.jit`); metrics (sum, count).
  `frozen` (LoRA's base) is read, never differentiated."""
  aux, grads = mean_grads(_bind(loss_fn, frozen), state.params, batch, step_rng(state))
  state = state.apply_gradients(grads=grads)
  sums = dict(aux, grad_norm=(optax.tree.norm(grads), jnp.float32(1.0)))
  return state, sums


def eval_step(params, batch: dict, frozen=None, *, loss_fn: LossFn) -> dict:
  """Loss metrics on the global batch with a fixed key, as (sum, count)."""
  _, aux = _bind(loss_fn, frozen)(params, batch, jax.random.PRNGKey(0))
  return aux


def evaluate(p_eval: Callable, params, batches: Iterable[dict], mesh, frozen=None) -> dict[str, float]:
  """Runs a finite pass of eval batches (host batches, this process's rows) and returns the summarized metrics."""
  total, base = None, () if frozen is None else (frozen,)
  for batch in batches:
    sums = jax.tree.map(lambda x: np.asarray(x, np.float64),
                        parallel.to_host(p_eval(params, parallel.put_batch(mesh, batch, "eval batch"), *base)))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  return metrics.summarize(total) if total is not None else {}


def compile_steps(loss_fn: LossFn, mesh, state_sh, frozen_sh=None) -> tuple[Callable, Callable]:
  """(train step, eval step) compiled over `mesh`: the state laid out as `state_sh` (and donated), batches over
  ("data", "fsdp"), the frozen base (if any) as `frozen_sh`, metrics replicated."""
  batch, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  frozen_in = () if frozen_sh is None else (frozen_sh,)  # without a base: (state, batch) and (params, batch)
  p_train = parallel.jit(functools.partial(train_step, loss_fn=loss_fn), (state_sh, batch, *frozen_in),
                         (state_sh, rep), donate_argnums=(0,))
  p_eval = parallel.jit(functools.partial(eval_step, loss_fn=loss_fn), (state_sh.params, batch, *frozen_in), rep)
  return p_train, p_eval


def poison(batch: dict) -> dict:
  """Test-only fault injection: every float array of the batch set to NaN (so the loss becomes NaN)."""
  return {k: np.full_like(v, np.nan) if np.issubdtype(np.asarray(v).dtype, np.floating) else v
          for k, v in batch.items()}


def count_tokens(batch: dict) -> float:
  """Non-pad tokens of a batch (segment ids > 0), for tokens/s."""
  seg = batch.get("segment_ids")
  return float(np.count_nonzero(seg)) if seg is not None else 0.0


def train_config(num_steps: int = 200) -> ml_collections.ConfigDict:
  """The `cfg.train` group shared by pretraining, SFT and RM configs."""
  t = ml_collections.ConfigDict()
  t.num_steps = num_steps  # train_step calls (micro-batches; optimizer updates = num_steps / opt.grad_accum)
  t.seed = 0  # init and step RNG
  t.log_every = 10  # steps between metrics.jsonl / TensorBoard rows
  t.eval_every = 100  # steps between evaluations (0 = only at the end)
  t.eval_batches = 8  # max eval batches per evaluation (0 = whole eval split)
  t.checkpoint_every = 100  # steps between checkpoints (the last step is always saved)
  t.keep_checkpoints = 2  # checkpoints kept in workdir/checkpoints
  t.init_from = ""  # another stage's workdir, or hf:/path/to/hf_dir (params only; ignored when resuming)
  t.nan_at_step = -1  # test-only fault injection: poison the batch of this step with NaN (-1 = off)
  return t


def initial_state(ckpt: checkpoint.Checkpointer, scratch_state: Callable[[], Any], abstract, state_sh,
                  init_from_params: Callable[[Any], Any] | None) -> tuple[int, Any, dict | None]:
  """(start step, sharded state, checkpoint extra or None): resume > init_from > scratch, each built directly on
  the shardings `state_sh` (restored shard by shard; scratch compiled with sharded outputs)."""
  start = ckpt.latest_step()
  if start is not None:
    state, extra = ckpt.restore(start, parallel.with_shardings(abstract, state_sh))
    return start, state, extra
  # leaves out, rebuilt in `abstract`'s structure: a scratch_state that builds its optimizer inside returns a new
  # (unequal) tx on every trace, which a TrainState-shaped out_shardings would reject
  leaves = parallel.jit(lambda: jax.tree.leaves(scratch_state()), (), jax.tree.leaves(state_sh))()
  state = jax.tree.unflatten(jax.tree.structure(abstract), leaves)
  if init_from_params is not None:
    state = state.replace(params=parallel.shard_tree(init_from_params(state.params), state_sh.params))
  return 0, state, None


def train_loop(*, workdir: str, train_cfg: ml_collections.ConfigDict, loss_fn: LossFn,
               scratch_state: Callable[[], TrainState], train_loader, eval_batches: Callable[[], Iterator[dict]]
               | None = None, init_from_params: Callable[[Any], Any] | None = None, meta: dict | None = None,
               stage: str = "train", mesh=None, param_specs: Any = None, frozen: Any = None,
               frozen_specs: Any = None) -> tuple[TrainState, dict]:
  """Trains `train_cfg.num_steps` steps with eval, checkpoints, auto-resume, metrics; returns (sharded state, last
  metrics).

  Resume order: checkpoint in `workdir` > `init_from_params(fresh_params)` > `scratch_state()`.
  `train_loader` yields this host's rows of global batches and has `get_state()`/`set_state()` (saved with each
  checkpoint). The state lives on `mesh` (default: pure data parallelism over every device), its parameters laid
  out by `param_specs` (their logical PartitionSpecs, e.g. model.logical_axes(...); None: replicated).
  `frozen` (LoRA's base): params every step reads but never trains nor saves, laid out by `frozen_specs`; then
  `loss_fn(params, batch, rng, frozen)`.
  """
  # ---- state: resume > init_from > scratch, built on its shardings
  mesh = mesh if mesh is not None else parallel.make_mesh()
  abstract = jax.eval_shape(scratch_state)
  state_sh = parallel.state_shardings(mesh, abstract, param_specs)
  ckpt = checkpoint.Checkpointer(workdir, keep=train_cfg.keep_checkpoints)
  start, state, extra = initial_state(ckpt, scratch_state, abstract, state_sh, init_from_params)
  if extra is not None:
    train_loader.set_state(extra["data"])
    logging.info("%s: resumed from %s at step %d", stage, ckpt.directory, start)
  if start >= train_cfg.num_steps:
    logging.info("%s: already finished (%d steps)", stage, start)
    ckpt.close()
    return state, {}

  # ---- compiled steps
  logging.info("%s: %s", stage, parallel.describe_mesh(mesh))
  frozen_sh = None
  if frozen is not None:
    frozen_sh = parallel.param_shardings(mesh, frozen, frozen_specs) if frozen_specs is not None else \
        jax.tree.map(lambda _: parallel.replicated(mesh), frozen)
    frozen = parallel.shard_tree(frozen, frozen_sh)
  p_train, p_eval = compile_steps(loss_fn, mesh, state_sh, frozen_sh)
  base = () if frozen is None else (frozen,)
  writer = metrics.MetricWriter(workdir, resume_step=start)
  progress = metrics.Progress(train_cfg.num_steps, start)
  last: dict[str, float] = {}

  def finish(step, sums, tokens):
    """Fetches a dispatched step's metrics, stops on NaN/Inf, logs."""
    nonlocal last
    last = metrics.summarize(parallel.to_host(sums))
    metrics.check_finite(last, step, stage)
    line = progress.update(step, tokens)
    if step % train_cfg.log_every == 0 or step == train_cfg.num_steps:
      writer.write(step, last, prefix="train_")
      logging.info("%s %s  loss %.4f", stage, line, last["loss"])

  def run_eval(step):
    if eval_batches is None:
      return
    t0 = time.perf_counter()
    result = evaluate(p_eval, state.params, eval_batches(), mesh, frozen)
    metrics.check_finite(result, step, f"{stage} eval")
    writer.write(step, result, prefix="eval_")
    logging.info("%s eval step %d: %s (%.1fs)", stage, step, result, time.perf_counter() - t0)

  # ---- loop: dispatch step N, then fetch step N-1's metrics (async); pending saves finish even on error
  try:
    pending = None
    for step in range(start + 1, train_cfg.num_steps + 1):
      batch = next(train_loader)
      if step == train_cfg.nan_at_step:
        batch = poison(batch)
      state, sums = p_train(state, parallel.put_batch(mesh, batch, "data.batch_size"), *base)
      if pending is not None:
        finish(*pending)
      pending = (step, sums, count_tokens(batch))
      save = step % train_cfg.checkpoint_every == 0 or step == train_cfg.num_steps
      if save or (train_cfg.eval_every and step % train_cfg.eval_every == 0):
        finish(*pending)
        pending = None
      if train_cfg.eval_every and step % train_cfg.eval_every == 0 or step == train_cfg.num_steps:
        run_eval(step)
      if save:
        ckpt.save(step, state, {"data": train_loader.get_state(), "meta": meta or {}})
    if pending is not None:
      finish(*pending)
    last.update(progress.rates(train_cfg.num_steps))
  finally:
    ckpt.close()
    writer.close()
  logging.info("%s: done at step %d: %s", stage, train_cfg.num_steps, last)
  return state, last
