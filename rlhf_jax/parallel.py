"""The only device-aware module: pmap wrapping, replication, batch sharding, collectives, multi-host init.

Step code is written per device with the named axis `AXIS`; `pmap` below is the one place it is mapped over
local devices, so moving to `jit(shard_map(...))` is a change to this file alone.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

AXIS = "batch"


def pmap(fn: Callable, static_broadcasted_argnums=(), donate_argnums=()) -> Callable:
  """Maps a per-device step over all local devices along the named axis `AXIS`."""
  return jax.pmap(fn, axis_name=AXIS, static_broadcasted_argnums=static_broadcasted_argnums,
                  donate_argnums=donate_argnums)


def pmean(tree):
  """Mean over the device axis (inside a pmapped function)."""
  return jax.lax.pmean(tree, AXIS)


def psum(tree):
  """Sum over the device axis (inside a pmapped function)."""
  return jax.lax.psum(tree, AXIS)


def device_index():
  """This device's index along the device axis (inside a pmapped function)."""
  return jax.lax.axis_index(AXIS)


def device_count() -> int:
  """Number of local devices a pmapped step runs on."""
  return jax.local_device_count()


def _sharding(n: int) -> jax.sharding.NamedSharding:
  """The layout pmap gives its outputs: leading axis split over the first `n` local devices."""
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:n]), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree, n: int | None = None):
  """One copy of a pytree per local device (leading axis = device), laid out as pmap outputs are.

  Matching pmap's own output layout means the second call of a pmapped step does not recompile.
  """
  n = n or device_count()
  sharding = _sharding(n)
  return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding), tree)


def unreplicate(tree):
  """The first device's copy of a replicated pytree, as host numpy arrays."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0] if isinstance(x, jax.Array)
                      else np.asarray(x[0]), tree)


def check_divisible(batch_size: int, field: str) -> int:
  """Per-device batch size; ValueError naming `field` when not divisible by the local device count."""
  n = device_count()
  if batch_size <= 0 or batch_size % n:
    raise ValueError(f"{field}={batch_size} must be a positive multiple of the local device count ({n})")
  return batch_size // n


def shard_batch(batch: Any, field: str = "batch"):
  """Reshapes every leaf's leading axis B -> (devices, B / devices); ValueError naming `field` if not divisible."""
  n = device_count()

  def _shard(x):
    x = np.asarray(x)
    check_divisible(x.shape[0], field)
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return jax.tree.map(_shard, batch)


def unshard(tree):
  """Inverse of `shard_batch` for device outputs: (devices, b, ...) -> (devices * b, ...) host arrays."""
  return jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]), tree)


def agree_with_process_0(flag: bool) -> bool:
  """Process 0's value of a host-side boolean on every process (no-op with one process)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Starts JAX's multi-controller runtime when a coordinator is given (flags or JAX_COORDINATOR_ADDRESS/...).

  On TPU pods and SLURM/Kubernetes GPU clusters `jax.distributed.initialize()` discovers these itself; pass
  `coordinator_address="auto"` for that. CPU runs use gloo collectives across processes.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not coordinator_address:
    return
  if coordinator_address == "auto":
    jax.distributed.initialize()
  else:
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    process_id = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "0"))
    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


@functools.lru_cache(maxsize=None)
def describe_devices() -> str:
  """One line naming the devices this process sees, for the experiment logs."""
  return (f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local devices "
          f"({jax.devices()[0].platform}), {jax.device_count()} global")
