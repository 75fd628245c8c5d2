"""PPO's networks and state: the trained groups (policy, value), the frozen ones (reference, reward model), the
update's state, one scored rollout, the static architectures, LoRA's effective networks, and the logical axes of
each group (how the mesh lays them out). Re-exported by ppo.py.
"""
from __future__ import annotations

from typing import Any

import jax
from flax import struct

from rlhf_jax import lora
from rlhf_jax import model as model_lib
from rlhf_jax.model import TransformerConfig


@struct.dataclass
class Trainable:
  """The trained parameter groups: policy (Transformer) and value ({"backbone", "head"}; None for RLOO)."""
  policy: Any
  value: Any


@struct.dataclass
class Frozen:
  """The frozen parameter groups: reference policy (SFT) and reward model ({"backbone", "head"})."""
  ref: Any
  reward: Any


@struct.dataclass
class PPOState:
  """Everything the update changes: iteration counter, trainable params, optimizer state, base RNG."""
  step: jax.Array
  params: Trainable
  opt_state: Any
  rng: jax.Array


@struct.dataclass
class Rollout:
  """One scored rollout batch: sequences for the forward passes and per-response-token PPO targets."""
  sequence_BxS: jax.Array  # prompt (left-padded, P slots) + response (T slots)
  segment_ids_BxS: jax.Array  # 1 on real tokens, 0 on padding
  positions_BxS: jax.Array
  mask_BxT: jax.Array  # response tokens (float32) of the rows the loss counts (dropped groups: 0)
  old_logp_BxT: jax.Array
  ref_logp_BxT: jax.Array
  old_values_BxT: jax.Array
  advantages_BxT: jax.Array
  returns_BxT: jax.Array


@struct.dataclass(frozen=True)
class Models:
  """Static architecture of each network (hashable: part of the compiled functions' identity)."""
  policy: TransformerConfig = struct.field(pytree_node=False)
  value: TransformerConfig = struct.field(pytree_node=False)
  reward: TransformerConfig = struct.field(pytree_node=False)
  lora: lora.Spec = struct.field(pytree_node=False, default=lora.Spec())  # rank 0: params are the full networks
  value_base: str = struct.field(pytree_node=False, default="ref")  # LoRA value adapters on "ref" or "reward"


def effective(params: Trainable, frozen: Frozen | None, models: Models, merged: bool = False) -> Trainable:
  """The full networks: with LoRA, policy = the reference with its adapters and value = {base with its adapters,
  head} (base: the reference or the RM backbone, `models.value_base`), attached for the model's unmerged path or
  `merged` into the kernels (lora.join); without LoRA `params` itself."""
  spec = models.lora
  if not spec.enabled:
    return params
  value = None
  if params.value is not None:
    base = frozen.ref if models.value_base == "ref" else frozen.reward["backbone"]
    value = lora.join(params.value, base, spec, "backbone", merged)
  return Trainable(policy=lora.join(params.policy, frozen.ref, spec, merged=merged), value=value)


def network_axes(models: Models, rm_params, value_params, trainable: Trainable) -> tuple[Trainable, Frozen]:
  """Logical PartitionSpecs of the trained groups (full networks, or LoRA adapters + value head) and the frozen
  ones (reference = the policy's base, reward model)."""
  from rlhf_jax import stages
  policy_axes = model_lib.logical_axes(lambda: model_lib.boxed_params(models.policy, jax.random.PRNGKey(0)))
  value_axes = None if value_params is None else stages.reward_axes(models.value, value_params)
  frozen = Frozen(ref=policy_axes, reward=stages.reward_axes(models.reward, rm_params) if rm_params else None)
  if not models.lora.enabled:
    return Trainable(policy=policy_axes, value=value_axes), frozen
  value = None if value_axes is None else lora.trainable_axes(value_axes["backbone"], trainable.value["adapters"],
                                                              models.lora, value_axes)
  return Trainable(policy=lora.trainable_axes(policy_axes, trainable.policy["adapters"], models.lora), value=value), \
      frozen
