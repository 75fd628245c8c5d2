"""orbax checkpoints: save/restore the train state with the data position; params-only init for the next stage.

Resume order used by every stage: an existing checkpoint in the workdir > `init_from` (another stage's
workdir or an `hf:` directory, params only) > scratch.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax import parallel

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
  """An orbax CheckpointManager over `workdir/checkpoints` saving {state, extra (JSON: data position, meta)}."""

  def __init__(self, workdir: str, keep: int = 2, create: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, extra: dict) -> None:
    """Saves `state` (sharded jax.Arrays: every process writes its own shards; or host arrays) and the JSON-able
    `extra` at `step` (atomic: written then renamed)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state shaped like `abstract_state`, extra) saved at `step`, onto the shardings its ShapeDtypeStructs
    carry (parallel.with_shardings: any mesh, whichever wrote it); a ValueError naming the workdir and the
    parameters when the saved state has others (a run with another config wrote it)."""
    self._check_params(step, abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
    return out["state"], out["extra"]

  def host_target(self, step: int) -> Any:
    """A restore target of host numpy arrays shaped like the state saved at `step` (whatever mesh, device count or
    process count wrote it; np.empty: no memory is touched before the read)."""
    with ocp.StandardCheckpointer() as reader:
      saved = reader.metadata(os.path.join(self.directory, str(step), "state")).item_metadata
    return jax.tree.map(lambda m: np.empty(m.shape, m.dtype), saved.tree if hasattr(saved, "tree") else saved)

  def _check_params(self, step: int, abstract_state: Any) -> None:
    """Compares the parameter names saved at `step` with those of `abstract_state` (before orbax's own error)."""
    with ocp.StandardCheckpointer() as reader:  # an async checkpointer: closed, so no thread outlives the read
      saved = reader.metadata(os.path.join(self.directory, str(step), "state")).item_metadata
    want, have = (_param_names(t) for t in (abstract_state, saved))
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
      raise ValueError(f"{self.directory}/{step}: the saved state does not match what this config builds: missing "
                       f"{missing[:4]}, unexpected {unexpected[:4]}. A run with another config (model shape, reward "
                       "loss.loglik_feature / loss.token_head, ...) wrote it: resume with that run's flags or give a "
                       "fresh --workdir")

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _param_names(state) -> set[str]:
  """"params/..." names of the leaves under a state's params (attribute, dict key or index, whichever a path uses)."""
  name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  paths = ("/".join(name(k) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(state))
  return {p for p in paths if p.startswith("params/")}


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds at least one finished checkpoint (orbax step folders are plain integers).

  Reads the folder without orbax (whose manager runs cross-process barriers) and takes process 0's answer,
  so hosts that look at different moments of a fresh shared workdir still agree.
  """
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  found = os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
  return parallel.agree_with_process_0(found)


def load_params(workdir: str, key: str = "params", step: int | None = None) -> tuple[Any, dict]:
  """The `state[key]` tree (numpy) and extra JSON of the latest checkpoint (or the one at `step`) in `workdir`."""
  if not has_checkpoint(workdir):
    raise ValueError(f"init_from={workdir!r}: no checkpoint found under {os.path.join(workdir, CHECKPOINT_DIR)}")
  ckpt = Checkpointer(workdir, create=False)
  if step is not None and step not in ckpt.manager.all_steps():
    ckpt.close()
    raise ValueError(f"{workdir!r}: no checkpoint at step {step} (saved: {saved_steps(workdir)})")
  step = ckpt.latest_step() if step is None else step
  out = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(ckpt.host_target(step)), extra=ocp.args.JsonRestore()))
  ckpt.close()
  state = out["state"]
  if key not in state:
    raise ValueError(f"init_from={workdir!r}: checkpoint state has no {key!r} (has {sorted(state)})")
  return jax.tree.map(np.asarray, state[key]), out["extra"]


def saved_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in `workdir`, ascending ([] when there are none)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def load_extra(workdir: str) -> dict:
  """The JSON `extra` (data position, meta) of the latest checkpoint in `workdir`, without loading arrays."""
  if not has_checkpoint(workdir):
    raise ValueError(f"init_from={workdir!r}: no checkpoint found under {os.path.join(workdir, CHECKPOINT_DIR)}")
  ckpt = Checkpointer(workdir, create=False)
  out = ckpt.manager.restore(ckpt.latest_step(), args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
  ckpt.close()
  return out["extra"]


def check_same_structure(expected: Any, got: Any, source: str) -> None:
  """ValueError naming the first missing/extra parameter or shape mismatch between two param trees."""
  exp = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  have = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(got)}
  missing, extra = sorted(set(exp) - set(have)), sorted(set(have) - set(exp))
  if missing or extra:
    raise ValueError(f"{source}: parameters differ from the configured model (different architecture?): "
                     f"missing {missing[:5]}, unexpected {extra[:5]}")
  for name, shape in exp.items():
    if have[name] != shape:
      raise ValueError(f"{source}: parameter {name} has shape {have[name]}, the configured model expects {shape} "
                       f"(different architecture?)")
