"""The RL stage's configuration: `cfg.ppo` knobs (PPO with a critic, RLOO, the GRPO family) and the validated,
hashable `Hyper` the compiled rollout scoring and update close over. Re-exported by ppo.py (`ppo.config`,
`ppo.ppo_config`, `ppo.Hyper`).

One scanned update serves every method; the options pick its pieces:
  advantage  "gae": GAE(γ, λ) on a value network (PPO, InstructGPT); "rloo": score minus the leave-one-out mean of
             its group, then the reward-to-go (no critic); "grpo": `rl.group_advantages` of the group's scores
             (scale_rewards: group / batch / none), the same advantage on every token (no critic).
  loss_agg   "bnpo" = "dapo" (token mean over the batch: today's PPO), "grpo" (mean of sequence means), "dr_grpo".
  kl_in      "reward": −β·kl_t in the shaped reward (InstructGPT); "loss": + β·k3 in the policy loss (GRPO).
  clip_low / clip_high (DAPO's clip-higher; 0 = clip_eps), ratio_level token | sequence (GSPO).
  drop_equal_groups  DAPO's dynamic sampling, by masking: a group whose G scores are all equal gets zero weight in
             the loss (its rows leave every numerator and denominator), so shapes stay static and nothing is
             resampled; the effective batch shrinks by the logged fraction "dropped_groups".
"""
from __future__ import annotations

import dataclasses

import ml_collections

from rlhf_jax import lora, optimizer, parallel, rl, trainer

ADVANTAGES = ("gae", "rloo", "grpo")
KL_IN = ("reward", "loss")


@dataclasses.dataclass(frozen=True)
class Hyper:
  """PPO hyper-parameters the compiled functions close over (hashable; from `cfg.ppo`), validated on creation.

  Empty `advantage`, `loss_agg` and `kl_in` are derived: advantage "gae" for group_size 1 and "rloo" above;
  loss_agg "grpo" for advantage grpo, else "bnpo" (token mean); kl_in "loss" for grpo, else "reward"; zero
  clip_low / clip_high are clip_eps.
  """
  kl_estimator: str
  gamma: float
  lam: float
  clip_eps: float
  vf_clip: float
  vf_coef: float
  ptx_coef: float
  whiten_advantages: bool
  ppo_epochs: int
  minibatches: int
  group_size: int = 1
  advantage: str = ""
  loss_agg: str = ""
  kl_in: str = ""
  clip_low: float = 0.0
  clip_high: float = 0.0
  ratio_level: str = "token"
  scale_rewards: str = "group"
  drop_equal_groups: bool = False

  def __post_init__(self):
    derived = {"advantage": self.advantage or ("gae" if self.group_size == 1 else "rloo")}
    grpo = derived["advantage"] == "grpo"
    derived["loss_agg"] = self.loss_agg or ("grpo" if grpo else "bnpo")
    derived["kl_in"] = self.kl_in or ("loss" if grpo else "reward")
    derived["clip_low"] = self.clip_low or self.clip_eps
    derived["clip_high"] = self.clip_high or self.clip_eps
    for name, value in derived.items():
      object.__setattr__(self, name, value)
    _validate(self)

  @property
  def critic(self) -> bool:
    """Whether a value network is built, scored and trained (GAE only)."""
    return self.advantage == "gae"

  @classmethod
  def from_config(cls, ppo) -> "Hyper":
    return cls(**{f.name: ppo[f.name] for f in dataclasses.fields(cls)})


def _validate(h: Hyper) -> None:
  """One ValueError naming the config field for every bad option."""
  choices = {"kl_estimator": rl.KL_ESTIMATORS, "advantage": ADVANTAGES, "loss_agg": rl.LOSS_AGGS, "kl_in": KL_IN,
             "ratio_level": rl.RATIO_LEVELS, "scale_rewards": rl.GROUP_SCALES}
  for field, allowed in choices.items():
    if getattr(h, field) not in allowed:
      raise ValueError(f"config ppo.{field}={getattr(h, field)!r}; expected one of {allowed}")
  for field in ("ppo_epochs", "minibatches", "group_size"):
    if getattr(h, field) < 1:
      raise ValueError(f"config ppo.{field}={getattr(h, field)} must be >= 1")
  for field in ("clip_eps", "clip_low", "clip_high", "vf_clip"):
    if getattr(h, field) < 0:
      raise ValueError(f"config ppo.{field}={getattr(h, field)} must be >= 0")
  if h.clip_low >= 1:
    raise ValueError(f"config ppo.clip_low={h.clip_low} must be < 1 (the ratio's lower bound is 1 - clip_low)")
  needs_group = [f"advantage={h.advantage!r}"] if h.advantage in ("rloo", "grpo") else []
  needs_group += ["drop_equal_groups=True"] if h.drop_equal_groups else []
  if needs_group and h.group_size < 2:
    raise ValueError(f"config ppo.group_size={h.group_size} must be >= 2 with ppo.{needs_group[0]} (it compares "
                     f"each prompt's group of responses)")


def ppo_config() -> ml_collections.ConfigDict:
  """The `cfg.ppo` group: the ablation knobs of InstructGPT's PPO-ptx and of the critic-free methods."""
  p = ml_collections.ConfigDict()
  p.reward_from = ""  # reward-model workdir (frozen RM; its reward_offset.json is subtracted)
  p.value_init = "reward"  # value network from the RM ("reward") or SFT backbone + fresh head ("sft"); gae only
  p.kl_coef = 0.05  # β, KL penalty to the SFT policy (initial value when adaptive)
  p.adaptive_kl = False  # Ziegler et al. adaptive β towards kl_target
  p.kl_target = 3.0  # target KL per response (nats, summed over tokens) for adaptive β
  p.kl_horizon = 10000  # adaptive β horizon (in rollout samples)
  p.kl_estimator = "k1"  # per-token KL estimator in the reward (and the logged "kl"): k1 | k2 | k3
  p.kl_in = ""  # where β·KL goes: "reward" (−β·kl_t shaped reward) | "loss" (+β·k3 in the loss); "": by advantage
  p.ptx_coef = 1.0  # γ, pretraining-mix coefficient (0 = plain PPO)
  p.advantage = ""  # gae (critic) | rloo | grpo; "": gae for group_size 1, rloo above
  p.loss_agg = ""  # policy-loss aggregation: bnpo = dapo (token mean) | grpo (mean of sequence means) | dr_grpo
  #                  (sum / (B·max_new_tokens)); "": grpo for advantage grpo, else bnpo
  p.scale_rewards = "group"  # grpo advantage divisor: group | batch (std of all scores) | none (Dr. GRPO)
  p.clip_eps = 0.2  # policy ratio clip ε
  p.clip_low = 0.0  # lower clip: ratio >= 1 − clip_low (0 = clip_eps)
  p.clip_high = 0.0  # upper clip: ratio <= 1 + clip_high (0 = clip_eps; DAPO's clip-higher: 0.28)
  p.ratio_level = "token"  # importance ratio per token, or per sequence (GSPO: exp of the mean log-ratio)
  p.drop_equal_groups = False  # DAPO dynamic sampling: groups with all-equal scores get zero loss weight
  p.vf_clip = 0.2  # value clip around the old values
  p.vf_coef = 0.5  # value-loss weight
  p.gamma = 1.0  # discount
  p.lam = 0.95  # GAE λ
  p.whiten_advantages = True  # normalise gae/rloo advantages over the rollout batch (grpo: scale_rewards)
  p.ppo_epochs = 2  # passes over each rollout batch
  p.minibatches = 2  # minibatches per epoch (rows per batch shard must divide)
  p.rollout_batch = 32  # responses per iteration (global; divisible by mesh.data × mesh.fsdp × minibatches)
  p.group_size = 1  # responses per prompt (rloo / grpo: the group compared; >= 2)
  p.temperature = 1.0  # rollout sampling temperature
  p.top_k = 0  # rollout top-k (0 = off)
  p.top_p = 1.0  # rollout nucleus (1 = off)
  p.max_new_tokens = 16  # response length cap
  p.sample_every = 10  # iterations between logged sample completions (0 = never)
  return p


def config() -> ml_collections.ConfigDict:
  """The whole config of the PPO experiment: data (prompts, ptx), ppo knobs, optimizer, iterations."""
  cfg = ml_collections.ConfigDict()
  cfg.data = ml_collections.ConfigDict()
  cfg.data.prompts = ""  # RL prompts JSONL {"prompt"} (or tfds:NAME)
  cfg.data.ptx = ""  # pretraining text for the ptx term (required when ppo.ptx_coef > 0)
  cfg.data.prompt_len = 32  # P: prompts are left-padded to this many tokens (incl. bos)
  cfg.data.truncate = False  # cut prompts longer than prompt_len from the left instead of raising
  cfg.data.chat_template = False  # True: render prompts with the tokenizer's chat template (kept if SFT used it)
  cfg.data.ptx_seq_len = 64  # packed pretraining rows for the ptx term
  cfg.data.ptx_batch_size = 16  # ptx rows per iteration (split over the minibatches)
  cfg.data.seed = 0  # prompt order
  cfg.ppo = ppo_config()
  cfg.opt = optimizer.default_config(lr=2e-5)
  cfg.opt.warmup_steps = 0
  cfg.opt.schedule = "constant"
  cfg.opt.weight_decay = 0.0
  cfg.train = trainer.train_config(num_steps=100)  # num_steps = PPO iterations (rollout + update)
  cfg.lora = lora.config()  # rank > 0: policy and value train adapters on the frozen SFT / RM weights
  cfg.train.log_every = 1
  cfg.train.checkpoint_every = 25
  cfg.mesh = parallel.mesh_config()
  return cfg


def check_sources(cfg: ml_collections.ConfigDict, hyper: Hyper, has_reward_fn: bool) -> None:
  """ValueError naming the field: value_init, the SFT source, and an RM source where one is needed."""
  if cfg.ppo.value_init not in ("reward", "sft"):
    raise ValueError(f"config ppo.value_init={cfg.ppo.value_init!r}; expected 'reward' or 'sft'")
  if not cfg.train.init_from:
    raise ValueError("config train.init_from is empty: give the SFT workdir (policy and reference)")
  if not cfg.ppo.reward_from and (not has_reward_fn or (hyper.critic and cfg.ppo.value_init == "reward")):
    raise ValueError("config ppo.reward_from is empty: give the reward-model workdir" +
                     (" (with a reward function it only initialises the value network: or set ppo.value_init="
                      "'sft')" if has_reward_fn else ""))


def check_models(cfg: ml_collections.ConfigDict, hyper: Hyper, mesh, policy_cfg, rm_cfg) -> int:
  """The loaded policy and RM against the mesh, each other and the rollout shape; returns rows per batch shard."""
  parallel.check_model(policy_cfg, mesh, f"the policy of train.init_from={cfg.train.init_from!r}: model")
  parallel.check_model(rm_cfg, mesh, f"the reward model of ppo.reward_from={cfg.ppo.reward_from!r}: model")
  if rm_cfg.vocab_size != policy_cfg.vocab_size:
    raise ValueError(f"reward model {cfg.ppo.reward_from!r} vocab_size={rm_cfg.vocab_size} differs from the "
                     f"policy's ({policy_cfg.vocab_size}): they must share the tokenizer")
  total = cfg.data.prompt_len + cfg.ppo.max_new_tokens
  for name, m in (("policy", policy_cfg), ("reward model", rm_cfg)):
    if total > m.max_len:
      raise ValueError(f"config data.prompt_len={cfg.data.prompt_len} + ppo.max_new_tokens="
                       f"{cfg.ppo.max_new_tokens} = {total} exceeds the {name}'s max_len={m.max_len}")
  rows = parallel.check_divisible(cfg.ppo.rollout_batch, "config ppo.rollout_batch", mesh)
  for field, value, why in (("ppo.minibatches", hyper.minibatches, ""),
                            ("ppo.group_size", hyper.group_size, " (a prompt's responses share a shard)")):
    if rows % value:
      raise ValueError(f"config ppo.rollout_batch={cfg.ppo.rollout_batch} gives {rows} rows per batch shard, not "
                       f"divisible by {field}={value}{why}")
  return rows
