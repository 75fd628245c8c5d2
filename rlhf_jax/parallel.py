"""The only device-aware module: the device Mesh, the logical-axis -> mesh-axis rule table, the shardings of
params, optimizer states, batches and KV caches, the jit call with its in/out shardings, host transfers and
multi-host init. Nothing else imports jax.sharding.

Step code is written for the GLOBAL batch and stays pure: `jit` below compiles it over a `Mesh` of all
(global) devices with axes `MESH_AXES` = ("data", "fsdp", "tensor"), and GSPMD inserts the collectives. Batches
shard their leading axis over ("data", "fsdp"); parameters carry logical axis names (model.py) that `RULES` maps
to mesh axes: FSDP shards the model width ("embed") of every matrix over "fsdp", Megatron-style tensor
parallelism shards heads, kv heads, the MLP width and the vocabulary over "tensor". The default mesh
(data=-1, fsdp=1, tensor=1) is pure data parallelism: every parameter replicated, the batch split.

Typical use (see trainer.train_loop):
  mesh = parallel.make_mesh(cfg.mesh)                                  # ValueError on a bad mesh
  specs = model.logical_axes(lambda: model.boxed_params(model_cfg, key))   # logical names, abstract
  state_sh = parallel.state_shardings(mesh, jax.eval_shape(make_state), specs)
  state = parallel.shard_tree(host_state, state_sh)                    # host numpy -> sharded jax.Arrays
  step = parallel.jit(train_step, (state_sh, parallel.batch_sharding(mesh)), (state_sh, parallel.replicated(mesh)),
                      donate_argnums=(0,))
  state, sums = step(state, parallel.put_batch(mesh, host_batch, "data.batch_size"))
  metrics = parallel.to_host(sums)
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a batch's leading axis is split over these (in this order)

# Logical axis name (model.py) -> mesh axis (None: replicated). A dimension that its mesh axis does not divide is
# replicated instead (e.g. GPT-2's vocabulary of 50257 over tensor=2); `check_model` rejects the splits that would
# silently lose most of the memory saving (heads, kv heads, MLP width over tensor; the model width over fsdp).
RULES = (
    ("embed", "fsdp"),  # D: the large dimension of every matrix (embeddings, attention, MLP, heads)
    ("vocab", "tensor"),  # V: embedding rows and untied output head
    ("heads", "tensor"),  # H: query heads (and the output projection's input)
    ("kv_heads", "tensor"),  # K: key/value heads (and the KV cache)
    ("mlp", "tensor"),  # F: the MLP hidden width
    ("head_dim", None),  # E
    ("positions", None),  # rows of the learned position table
    ("norm", None),  # norm scales and biases (D, small)
    ("scalar", None),  # the one output of a ScalarHead
    ("layers", None),  # the stacked layer axis of model.scan_layers (each device holds every layer's share)
)
# Logical names of activation dimensions (model.py, ppo.py: `constrain`), distinct from the parameters' so that FSDP
# all-gathers the weights and keeps activations split over the batch (MaxText's approach): without them GSPMD
# contracts over the fsdp-split model width of the weights and keeps the whole batch's activations on every device.
ACTIVATION_RULES = (
    ("activation_batch", BATCH_AXES),  # B: rows over the batch shards
    ("activation_length", None),  # L / T / S
    ("activation_embed", None),  # D of the residual stream: whole on every device
    ("activation_heads", "tensor"),  # H of q and the attention output
    ("activation_kv_heads", "tensor"),  # K of k and v
    ("activation_head_dim", None),  # E
    ("activation_mlp", "tensor"),  # F of the MLP hidden
    ("activation_vocab", "tensor"),  # V of the logits
)


def mesh_config() -> ml_collections.ConfigDict:
  """The `cfg.mesh` group of every stage: how the global devices are laid out (product = device count)."""
  m = ml_collections.ConfigDict()
  m.data = -1  # data-parallel replicas (-1 = the devices fsdp × tensor leave: pure data parallelism by default)
  m.fsdp = 1  # shards of every parameter's model width (and of the optimizer state); the batch splits over it too
  m.tensor = 1  # tensor-parallel shards of heads, kv heads, MLP width and vocabulary (keep within one host)
  return m


def make_mesh(mesh_cfg: ml_collections.ConfigDict | dict | None = None, devices: Sequence | None = None) -> Mesh:
  """A Mesh of `devices` (default: all global devices, in process order) shaped (data, fsdp, tensor).

  ValueError naming `config mesh.data/fsdp/tensor` when a size is not positive (data may be -1), when the product
  is not the device count, or (multi-host) when the tensor axis would span processes.
  """
  devices = list(jax.devices() if devices is None else devices)
  m = dict(mesh_config().to_dict(), **(dict(mesh_cfg) if mesh_cfg is not None else {}))
  unknown = sorted(set(m) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config mesh: unknown field(s) {unknown}; expected {list(MESH_AXES)}")
  data, fsdp, tensor = (int(m[a]) for a in MESH_AXES)
  where = f"config mesh.data={data}, mesh.fsdp={fsdp}, mesh.tensor={tensor}"
  if fsdp < 1 or tensor < 1 or (data < 1 and data != -1):
    raise ValueError(f"{where}: sizes must be >= 1 (mesh.data may be -1: the devices the others leave)")
  n = len(devices)
  if data == -1:
    if n % (fsdp * tensor):
      raise ValueError(f"{where}: fsdp × tensor = {fsdp * tensor} does not divide the {n} devices")
    data = n // (fsdp * tensor)
  if data * fsdp * tensor != n:
    raise ValueError(f"{where}: the product {data * fsdp * tensor} must equal the device count ({n})")
  local = jax.local_device_count()
  if jax.process_count() > 1 and local % tensor:
    raise ValueError(f"{where}: mesh.tensor must divide the {local} devices of each process (a batch shard's "
                     "tensor group stays within one host)")
  return Mesh(np.array(devices).reshape(data, fsdp, tensor), MESH_AXES)


def device_count() -> int:
  """Local devices: the batch shards per host of the default (pure data-parallel) mesh."""
  return jax.local_device_count()


def describe_mesh(mesh: Mesh) -> str:
  """One line naming the mesh's axis sizes, for the experiment logs."""
  return "mesh " + " × ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch is split: mesh data × fsdp."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def local_batch_shards(mesh: Mesh) -> int:
  """Batch shards held by this process (its rows must divide by this)."""
  return max(1, batch_shards(mesh) // jax.process_count())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis over ("data", "fsdp"), the rest replicated (use as a prefix for a whole batch pytree)."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (scalars, metrics, RNG keys, step counters)."""
  return NamedSharding(mesh, PartitionSpec())


# ------------------------------------------------------------------------------------------ parameters


def check_model(model_cfg, mesh: Mesh, where: str = "config model") -> None:
  """ValueError naming the config fields when tensor parallelism cannot split heads/kv heads/MLP width or fsdp
  cannot split the model width (`model_cfg`: a model.TransformerConfig or the `cfg.model` group)."""
  pairs = (("num_heads", "tensor"), ("num_kv_heads", "tensor"), ("d_ff", "tensor"), ("d_model", "fsdp"))
  for name, axis in pairs:
    value, size = getattr(model_cfg, name), mesh.shape[axis]
    if value % size:
      raise ValueError(f"{where}.{name}={value} is not divisible by config mesh.{axis}={size}")


# The KV-cache decode step's activations (one token per row: tiny next to the weights): weight-stationary, the model
# width split over fsdp like the kernels' "embed", the batch over data only, so each matmul contracts its local
# share of the weights and all-reduces the small activations instead of all-gathering the weights (which XLA
# hoists out of the token loop as every layer's full weights).
DECODE_ACTIVATION_RULES = (
    ("activation_batch", "data"),
    ("activation_length", None),
    ("activation_embed", "fsdp"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)
_TABLE = dict(RULES + ACTIVATION_RULES)
_DECODE_TABLE = dict(RULES + DECODE_ACTIVATION_RULES)


def _mesh_axis(logical: str | None, table: dict | None = None):
  table = _TABLE if table is None else table
  if logical is not None and logical not in table:
    raise ValueError(f"logical axis {logical!r} has no rule in parallel.RULES or ACTIVATION_RULES "
                     f"({list(table)})")
  return table.get(logical) if logical is not None else None


def mesh_spec(logical_spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, table: dict | None = None
              ) -> PartitionSpec:
  """The mesh PartitionSpec of an array of `shape` with logical names `logical_spec` (via `RULES` and
  `ACTIVATION_RULES`); a dimension its mesh axes do not divide, or a mesh axis already used by an earlier
  dimension, is replicated (a tuple of mesh axes, e.g. the batch shards, counts as one: all or none)."""
  out, used = [], set()
  for logical, dim in zip(tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec)), shape):
    axis = _mesh_axis(logical, table)
    axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    size = int(np.prod([mesh.shape[a] for a in axes]))
    if not axes or used & set(axes) or size == 1 or dim % size:
      out.append(None)
    else:
      out.append(axis)
      used.update(axes)
  return PartitionSpec(*out)


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def param_shardings(mesh: Mesh, abstract_params: Any, logical_specs: Any) -> Any:
  """NamedSharding per parameter from its shape (array or ShapeDtypeStruct) and logical PartitionSpec."""
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, mesh_spec(spec, np.shape(x), mesh)), logical_specs,
                      abstract_params, is_leaf=_is_spec)


def _names(path) -> tuple[str, ...]:
  """Plain names of a key path (attribute, dict key or sequence index)."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(mesh: Mesh, abstract_state: Any, logical_specs: Any) -> Any:
  """NamedSharding of every leaf of a train state (TrainState, PPOState, ...): a leaf whose key path ends with a
  parameter's path (relative to `state.<root>`, whose logical specs are `logical_specs`) is sharded like that
  parameter (the parameter itself, Adam's moments, accumulated gradients: optax states mirror the params); every
  other leaf (step, counters, RNG keys) is replicated. The longest matching path wins; `logical_specs=None`
  replicates everything."""
  table = {_names(p): spec for p, spec in jax.tree_util.tree_leaves_with_path(logical_specs, is_leaf=_is_spec)
           if logical_specs is not None}
  depth = max((len(k) for k in table), default=0)

  def leaf(path, x):
    names = _names(path)
    for start in range(max(0, len(names) - depth), len(names)):
      spec = table.get(names[start:])
      if spec is not None and len(spec) <= len(np.shape(x)):
        return NamedSharding(mesh, mesh_spec(spec, np.shape(x), mesh))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` carrying `shardings` (an orbax restore target: restores onto that layout)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), abstract, shardings)


def shard_tree(tree: Any, shardings: Any) -> Any:
  """Places a tree that every process holds in full (host numpy or jax arrays) onto `shardings`; each device only
  receives its own slice (make_array_from_callback), so this works across processes."""
  def put(x, s):
    if isinstance(x, jax.Array) and x.sharding == s:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  return jax.tree.map(put, tree, shardings)


# ------------------------------------------------------------------------------------------ batches


def check_divisible(batch_size: int, field: str, mesh: Mesh) -> int:
  """Rows per batch shard; ValueError naming `field` when the global batch does not split over data × fsdp."""
  n = batch_shards(mesh)
  if batch_size <= 0 or batch_size % n:
    raise ValueError(f"{field}={batch_size} must be a positive multiple of the batch shards (mesh.data × "
                     f"mesh.fsdp = {mesh.shape['data']} × {mesh.shape['fsdp']} = {n})")
  return batch_size // n


def put_batch(mesh: Mesh, host_batch: Any, field: str = "batch") -> Any:
  """This process's rows of a global batch (every host builds the same global rows and keeps its contiguous slice,
  as data.py's loaders do) -> global jax.Arrays sharded over ("data", "fsdp"); ValueError naming `field`."""
  sharding, procs = batch_sharding(mesh), jax.process_count()

  def put(x):
    x = np.asarray(x)
    check_divisible(x.shape[0] * procs, field, mesh)
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * procs,) + x.shape[1:])

  return jax.tree.map(put, host_batch)


def put_global_batch(mesh: Mesh, batch: Any, field: str = "batch") -> Any:
  """A batch every process holds in full (e.g. evaluation prompts) -> global arrays sharded over ("data", "fsdp")."""
  for x in jax.tree.leaves(batch):
    check_divisible(np.shape(x)[0], field, mesh)
  return shard_tree(batch, jax.tree.map(lambda _: batch_sharding(mesh), batch))


def to_host(tree: Any) -> Any:
  """Host numpy copies of a tree of global arrays (process_allgather only for arrays no process holds in full)."""
  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(get, tree)


def local_rows(tree: Any) -> Any:
  """This process's rows of batch-sharded arrays as host numpy (the rows its loader produced), no collective."""
  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    shards = {s.index[0].start or 0: s for s in x.addressable_shards}  # tensor replicas share a start row
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)], axis=0)

  return jax.tree.map(get, tree)


# ------------------------------------------------------------------------------------------ compiled functions


_ACTIVE: list[tuple[Mesh, dict] | None] = []  # (mesh, rule table) `jit` traces over (innermost last; None: off)


@contextlib.contextmanager
def _active(entry):
  _ACTIVE.append(entry)
  try:
    yield
  finally:
    _ACTIVE.pop()


def unconstrained():
  """Within it `constrain` leaves activations to GSPMD (the sampler's prefill)."""
  return _active(None)


def decode_layout():
  """Within it `constrain` lays activations out by DECODE_ACTIVATION_RULES (the KV-cache decode step)."""
  top = _ACTIVE[-1] if _ACTIVE else None
  return _active(None if top is None else (top[0], _DECODE_TABLE))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`x` pinned to the layout its logical dimension names give (`ACTIVATION_RULES`, or DECODE_ACTIVATION_RULES
  under `decode_layout`, via `mesh_spec`: a dimension its mesh axes do not divide stays replicated) while `jit`
  traces over a mesh of more than one device; unchanged otherwise (plain jax.jit, eager calls, one device,
  `unconstrained`). Names past `logical_axes` are None."""
  if not _ACTIVE or _ACTIVE[-1] is None or _ACTIVE[-1][0].size == 1:
    return x
  mesh, table = _ACTIVE[-1]
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, mesh_spec(PartitionSpec(*logical_axes),
                                                                           np.shape(x), mesh, table)))


def _mesh_of(shardings: Any) -> Mesh | None:
  for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
    if isinstance(s, NamedSharding):
      return s.mesh
  return None


def jit(fn: Callable, in_shardings: Any, out_shardings: Any, donate_argnums: Sequence[int] = (),
        mesh: Mesh | None = None) -> Callable:
  """`fn` (written for the global batch) compiled over `mesh` (default: the mesh the shardings name): GSPMD
  partitions it, and the activations `constrain` names keep their layout (batch-split, not fsdp-split).

  `in_shardings`/`out_shardings` are pytree prefixes of NamedShardings; None for an argument means "as the
  argument is already laid out". Arguments in `donate_argnums` (the train state) are updated in place.
  """
  mesh = mesh if mesh is not None else _mesh_of((in_shardings, out_shardings))
  jit_kw = dict(in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=tuple(donate_argnums))
  if mesh is None or mesh.size == 1:  # nothing to constrain: `fn` itself (shares jax's trace cache with eval_shape)
    return jax.jit(fn, **jit_kw)

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with _active((mesh, _TABLE)):
      return fn(*args, **kwargs)

  return jax.jit(traced, **jit_kw)


def cache_constraint(mesh: Mesh) -> Callable[[Any], Any]:
  """A function pinning a KV cache (model.init_cache's tree) inside a jitted sampler: keys/values
  (B, K, E|S, S|E) over batch shards and kv heads, segment ids (B, S) over batch shards, the index replicated;
  under scan_layers each leaf has a leading layer axis, kept whole."""
  batch = BATCH_AXES if batch_shards(mesh) > 1 else None

  def spec(x):
    shape = np.shape(x)
    lead = (None,) if len(shape) in (5, 3) else ()  # scan_layers: every leaf stacked on a leading layer axis
    shape = shape[len(lead):]
    if len(shape) == 4:
      kv = "tensor" if mesh.shape["tensor"] > 1 and shape[1] % mesh.shape["tensor"] == 0 else None
      return PartitionSpec(*lead, batch if shape[0] % batch_shards(mesh) == 0 else None, kv)
    if len(shape) == 2:
      return PartitionSpec(*lead, batch if shape[0] % batch_shards(mesh) == 0 else None)
    return PartitionSpec()

  def constrain(cache):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(x))), cache)

  return constrain


# ------------------------------------------------------------------------------------------ processes


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
