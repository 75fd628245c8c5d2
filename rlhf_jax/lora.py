"""LoRA adapters as a separate parameter tree: config, init, the unmerged forward, merge, which parameters train.

For a targeted kernel W (a DenseGeneral kernel: input dims I... then output dims O..., e.g. q (D, H, E),
o (H, E, D), fc_in (D, F), lm_head (D, V)) the adapter is A (I... x r, normal with std 1/√fan_in) and
B (r x O..., zeros), and the effective kernel is

    W_eff = W + (α / r) · A·B        (contracted over r; B = 0 at init, so step 0 is the base exactly).

Mechanism: an unmerged LoRA path inside the model's Dense layers. `join(base, adapters, spec)` (called inside
the jitted loss) puts (α/r)·A and B beside each adapted kernel as leaves `lora_a` / `lora_b` (`attach`), and
model.py's Dense computes

    y = x·W + (x·(α/r)A)·B        (`adapt`; W itself is never rewritten)

so `value_and_grad` over the adapters alone gives their gradients (the base is an argument that is never
differentiated nor in the optimizer), no full-size W_eff or dW_eff is ever formed (the backward needs W, x and
x·A: the per-device saving is the merged kernels and their gradients, not just the optimizer state), and the
reference policy of DPO/PPO is the base params themselves (adapters off): one copy of the base. Any leading axes
of W before I... (stacked `scan_layers` params) are kept: one adapter per layer, sliced by the scan like W.
`merge` forms W + (α/r)·A·B explicitly: for export (`fold`, then `hf_import.save_hf_checkpoint`), for a later
stage's init, and for PPO's sampler (one merged policy per iteration: decoding then costs the base's FLOPs).
Dropout on the adapter input (LoRA's `lora_dropout`) would need a dropout rng in the model's forward, which is
deterministic everywhere; `lora.dropout` must be 0 and anything else is rejected with an error saying so.

Adapter tree: the base tree's path to each targeted module, e.g. {"layer_0": {"attn": {"q": {"a", "b"}}}},
float32 whatever the base's param_dtype (a bf16 base merges into W_eff in float32, then the model casts to its
compute dtype).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

# target name -> (kernel ndim without stacked-layer axes, number of input dims); see model.py's modules
KERNELS = {"q": (3, 1), "k": (3, 1), "v": (3, 1), "o": (3, 2), "gate": (2, 1), "up": (2, 1), "down": (2, 1),
           "fc_in": (2, 1), "fc_out": (2, 1), "lm_head": (2, 1)}
ALIASES = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down", "fc_in", "fc_out")}  # whichever exist


def config() -> ml_collections.ConfigDict:
  """The `cfg.lora` group shared by every stage (rank 0: full fine-tuning, no adapters)."""
  c = ml_collections.ConfigDict()
  c.rank = 0  # r: adapter rank (0 = off: every parameter trains)
  c.alpha = 16.0  # α: the update is scaled by α / r
  c.dropout = 0.0  # adapter-input dropout: not implemented (the forward is deterministic), only 0 is accepted
  c.targets = "attn,mlp"  # comma-separated: q,k,v,o, gate,up,down (llama), fc_in,fc_out (gpt2), lm_head; attn, mlp
  c.base_dtype = ""  # storage of the frozen base: "" = as loaded (the model's param_dtype), bfloat16 = half
  return c


@dataclasses.dataclass(frozen=True)
class Spec:
  """Validated, hashable LoRA settings (from `cfg.lora`); `rank == 0` means off."""
  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = ()  # the requested names (aliases kept), sorted

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def kernels(self) -> frozenset[str]:
    """Module names adapted (aliases expanded)."""
    return frozenset(n for t in self.targets for n in ALIASES.get(t, (t,)))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, c) -> "Spec":
    """Validates `cfg.lora` (rank >= 0, alpha > 0, dropout 0, known targets): one ValueError naming the field."""
    if int(c.rank) != c.rank or c.rank < 0:
      raise ValueError(f"config lora.rank={c.rank} must be an integer >= 0 (0 = off)")
    if not c.alpha > 0:
      raise ValueError(f"config lora.alpha={c.alpha} must be > 0")
    if c.dropout != 0:
      raise ValueError(f"config lora.dropout={c.dropout}: adapter-input dropout is not implemented (the model's "
                       "forward is deterministic, with no dropout rng); only lora.dropout=0 is supported")
    if c.get("base_dtype", "") not in ("", "float32", "bfloat16", "float16"):
      raise ValueError(f"config lora.base_dtype={c.base_dtype!r}; expected '', float32, bfloat16 or float16")
    names = [t.strip() for t in str(c.targets).split(",") if t.strip()]
    unknown = [t for t in names if t not in KERNELS and t not in ALIASES]
    if unknown:
      raise ValueError(f"config lora.targets={c.targets!r}: unknown target {unknown[0]!r}; expected names from "
                       f"{sorted(KERNELS) + sorted(ALIASES)}")
    if c.rank > 0 and not names:
      raise ValueError(f"config lora.targets={c.targets!r} is empty with lora.rank={c.rank}")
    return cls(int(c.rank), float(c.alpha), tuple(sorted(set(names))) if c.rank > 0 else ())

  def meta(self) -> dict:
    """JSON-able description stored in checkpoint metadata (checked on resume and by later stages)."""
    return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def check_resume(saved: dict | None, spec: Spec, workdir: str) -> None:
  """ValueError naming the field and both values when a workdir's checkpoint was written with other LoRA settings."""
  saved = saved or Spec().meta()
  if not spec.enabled and not saved.get("rank"):
    return  # full fine-tuning both times (alpha/targets mean nothing at rank 0)
  for field, now in spec.meta().items():
    before = saved.get(field)
    if (list(before or []) if field == "targets" else before) != now:
      raise ValueError(f"config lora.{field}={now!r} but the checkpoint in {workdir!r} was written with "
                       f"lora.{field}={before!r}: resume with the same LoRA settings or give a fresh "
                       "--workdir")


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", k)))


def targeted(params, spec: Spec) -> dict[tuple[str, ...], tuple[int, int, tuple[int, ...]]]:
  """{module path: (stacked leading dims, input dims, kernel shape)} of every kernel the spec adapts."""
  found: dict[tuple[str, ...], tuple[int, int, tuple[int, ...]]] = {}
  for path, w in jax.tree_util.tree_leaves_with_path(params):
    keys = tuple(_key(k) for k in path)
    if len(keys) < 2 or keys[-1] != "kernel" or keys[-2] not in spec.kernels:
      continue
    ndim, n_in = KERNELS[keys[-2]]
    lead = len(w.shape) - ndim
    if lead < 0:
      raise ValueError(f"lora: kernel {'/'.join(keys)} has shape {tuple(w.shape)}; expected {ndim} dims")
    found[keys[:-1]] = (lead, n_in, tuple(w.shape))
  return found


def check_targets(params, spec: Spec) -> None:
  """ValueError when a requested target matches no kernel of this model (gate on gpt2, a tied lm_head)."""
  have = {p[-1] for p in targeted(params, spec)}
  for t in spec.targets:
    if not have.intersection(ALIASES.get(t, (t,))):
      why = " (its output head is tied to the embedding)" if t == "lm_head" else ""
      raise ValueError(f"config lora.targets={','.join(spec.targets)!r}: {t!r} matches no kernel of this "
                       f"model{why}")


def init(params, spec: Spec, rng: jax.Array) -> dict:
  """Adapters for every targeted kernel: a ~ N(0, 1/fan_in) of shape lead+I+(r,), b = 0 of shape lead+(r,)+O."""
  check_targets(params, spec)
  adapters: dict = {}
  for i, (path, (lead, n_in, shape)) in enumerate(sorted(targeted(params, spec).items())):
    fan_in = math.prod(shape[lead:lead + n_in])
    a = jax.random.normal(jax.random.fold_in(rng, i), shape[:lead + n_in] + (spec.rank,), jnp.float32)
    node = adapters
    for k in path:
      node = node.setdefault(k, {})
    node["a"] = a / math.sqrt(fan_in)
    node["b"] = jnp.zeros(shape[:lead] + (spec.rank,) + shape[lead + n_in:], jnp.float32)
  return adapters


def delta(a, b, lead: int, n_in: int, scale: float) -> jax.Array:
  """(α/r)·A·B contracted over r, shaped like the kernel: lead+I+(r,) x lead+(r,)+O -> lead+I+O."""
  lead_shape, in_shape, out_shape = a.shape[:lead], a.shape[lead:lead + n_in], b.shape[lead + 1:]
  r = a.shape[-1]
  a_xIxR = a.reshape(lead_shape + (math.prod(in_shape), r))
  b_xRxO = b.reshape(lead_shape + (r, math.prod(out_shape)))
  return (scale * jnp.matmul(a_xIxR, b_xRxO)).reshape(lead_shape + in_shape + out_shape)


def merge(params, adapters, spec: Spec):
  """Effective params: every adapted kernel W -> W + (α/r)·A·B (in the promoted dtype); the rest unchanged.

  Differentiable in `adapters`; `adapters=None` or a disabled spec returns `params` itself (the reference policy).
  """
  if adapters is None or not spec.enabled:
    return params
  sites = targeted(params, spec)

  def visit(node, prefix):
    if prefix in sites:
      lead, n_in, _ = sites[prefix]
      ad = _at(adapters, prefix, spec)
      w = node["kernel"]
      dt = jnp.promote_types(w.dtype, ad["a"].dtype)
      return dict(node, kernel=w.astype(dt) + delta(ad["a"], ad["b"], lead, n_in, spec.scale).astype(dt))
    if isinstance(node, dict) or hasattr(node, "items"):
      return {k: visit(v, prefix + (k,)) for k, v in node.items()}
    return node

  return visit(params, ())


def _at(adapters, path: tuple[str, ...], spec: Spec) -> dict:
  node = adapters
  for k in path:
    if k not in node:
      raise ValueError(f"lora: no adapter for {'/'.join(path)} (adapters built for other lora.targets than "
                       f"{list(spec.targets)}?)")
    node = node[k]
  return node


A_LEAF, B_LEAF = "lora_a", "lora_b"  # the leaves `attach` puts beside an adapted kernel (read by `adapt`)


def attach(params, adapters, spec: Spec):
  """The base tree with (α/r)·A and B beside every adapted kernel (leaves `A_LEAF`, `B_LEAF`; W unchanged), for the
  model's unmerged path. Differentiable in `adapters`; `adapters=None` or a disabled spec returns `params`."""
  if adapters is None or not spec.enabled:
    return params
  sites = targeted(params, spec)

  def visit(node, prefix):
    if prefix in sites:
      ad = _at(adapters, prefix, spec)
      return {**node, A_LEAF: spec.scale * ad["a"], B_LEAF: ad["b"]}
    if isinstance(node, dict) or hasattr(node, "items"):
      return {k: visit(v, prefix + (k,)) for k, v in node.items()}
    return node

  return visit(params, ())


def adapt(y, x, module_params, n_in: int, dtype):
  """y + (x·A)·B when a Dense module's params hold `attach`'s leaves (else y): x's last n_in dims contract with
  A's first n_in (A: I... x r, already scaled by α/r), then r with B's first (B: r x O...), in `dtype`."""
  if A_LEAF not in module_params:
    return y
  x, a, b = (jnp.asarray(v).astype(dtype) for v in (x, module_params[A_LEAF], module_params[B_LEAF]))
  xa = jax.lax.dot_general(x, a, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
  return y + jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (0,)), ((), ()))).astype(y.dtype)


def fold(params, adapters, spec: Spec):
  """Merged params in the base's own dtypes (host numpy-ready), for export and for the next stage's init."""
  merged = merge(params, adapters, spec)
  return jax.tree.map(lambda m, p: jnp.asarray(m).astype(jnp.asarray(p).dtype), merged, params)


def param_count(tree: Any) -> int:
  """Number of scalars in a pytree (adapters or any params)."""
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------ which parameters train (SFT, RM, PPO's networks)


def split(params, spec: Spec, rng: jax.Array, key: str | None = None) -> tuple[dict, Any]:
  """(trainable, frozen base) of a full tree: trainable = {"adapters"} plus, for an RM/value tree whose Transformer
  sits under `key` ("backbone"), every other group (its heads); frozen = the Transformer params."""
  base = params if key is None else params[key]
  trainable = {"adapters": init(base, spec, rng)}
  if key is not None:
    trainable.update({k: v for k, v in params.items() if k != key})
  return trainable, base


def join(trainable: dict, base, spec: Spec, key: str | None = None, merged: bool = False):
  """The effective full tree of `split`'s pair, with the other groups under their names: the base with its adapters
  attached (`attach`: the model's unmerged path, inside a loss) or, `merged=True`, merge(base, adapters)."""
  full = (merge if merged else attach)(base, trainable["adapters"], spec)
  if key is None:
    return full
  return {**{k: v for k, v in trainable.items() if k != "adapters"}, key: full}


def with_base(loss_fn, spec: Spec, key: str | None = None):
  """`loss_fn(params, batch, rng)` -> `fn(trainable, batch, rng, frozen)` on the joined tree (gradients reach the
  trainable tree only: the base is an argument, never differentiated)."""
  def fn(trainable, batch, rng, frozen):
    return loss_fn(join(trainable, frozen, spec, key), batch, rng)
  return fn


def cast_base(base, dtype: str):
  """The frozen base in `dtype` ("" keeps each leaf's own): e.g. bfloat16 halves its memory."""
  if not dtype:
    return base
  return jax.tree.map(lambda x: jnp.asarray(x).astype(dtype), base)


def adapter_axes(base_axes, adapters, spec: Spec):
  """Logical axis names of the adapters from the base kernels' (a PartitionSpec-like tuple per leaf): a takes the
  kernel's leading + input names and None for r, b the leading names, None, then the output names."""
  def visit(ad, ax):
    if set(ad) == {"a", "b"}:
      names, lead_in = tuple(ax["kernel"]), ad["a"].ndim - 1
      lead = ad["b"].ndim - 1 - (len(names) - lead_in)
      make = type(ax["kernel"])
      return {"a": make(*names[:lead_in], None), "b": make(*names[:lead], None, *names[lead_in:])}
    return {k: visit(v, ax[k]) for k, v in ad.items()}
  return visit(adapters, base_axes)


def trainable_axes(base_axes, adapters, spec: Spec, groups_axes: dict | None = None, key: str = "backbone") -> dict:
  """Logical specs of `split`'s trainable tree: {"adapters": named after their base kernels (`adapter_axes`), and
  every group of `groups_axes` but `key` (an RM/value network's heads) as it is there}."""
  others = {k: v for k, v in (groups_axes or {}).items() if k != key}
  return {"adapters": adapter_axes(base_axes, adapters, spec), **others}
