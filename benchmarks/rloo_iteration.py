"""RLOO iteration (G samples per prompt, leave-one-out baseline, KL-regularised, no critic): ours
(sampling.make_sampler, ppo.score_rollout, ppo.ppo_update under parallel.jit with ppo.Hyper(group_size=G) and Trainable(value=None)) vs TRL
1.x's RLOOTrainer, same GPT-2 policy / reference / reward sizes (D=256 L=6 H=8 vocab 8192, the same random weights
on both sides), 8 prompts x G=4 = 32 responses, prompts of 32 tokens -> up to 64 new tokens, k1 KL with β = 0.05,
2 epochs x 2 minibatches of 16 per rollout batch. Prints prompt+response tokens/s, the split generation / scoring /
update times, and ours / TRL.

Command: .venv-bench-trl1/bin/python -m benchmarks.rloo_iteration [--iters 5] [--order halves]   (or `make bench-rloo`;
the venv holds benchmarks/requirements-trl1.txt: TRL 1.x cannot share .venv-bench with trl 0.29's PPOTrainer)

TRL's knobs: num_generations = G, per_device_train_batch_size = G·N / minibatches with gradient_accumulation_steps
= 1 and steps_per_generation = minibatches (one optimizer step per minibatch), num_iterations = epochs, beta = β,
epsilon = clip ε, normalize_advantages = whiten_advantages, max_completion_length = new tokens, temperature 1,
top_k 0, top_p 1, float32, no dropout, gradient_checkpointing off (RLOOConfig turns it on by default; ours only
recomputes the attention rows). Both stop a response at token 1 (the tokenizer's EOS), AdamW lr 1e-5 (β2 0.999,
no weight decay, clip 1, linear decay) on both. Our iterations run between TRL's, one after each of TRL's
(from its step-end callback, outside TRL's timing): ABAB; `--order halves` runs half of ours before TRL's and half
after, as ppo_iteration does (both orders gave the same ratio, 2.70).

What cannot be matched (TRL 1.x's RLOO is sequence-level, ours per-token; the forwards and backwards are the same):
- reward: TRL subtracts β·Σ_t k1_t from the RM score and takes the leave-one-out baseline of that total; ours takes
  the baseline of the RM score and puts −β·k1_t on each token (`rl.shaped_rewards`).
- advantage and loss: TRL has one advantage per response and clips the ratio of whole-response probabilities
  exp(Σ_t log π/π_old), averaged over responses; ours clips per token with reward-to-go advantages (γ=1),
  averaged over tokens. Normalising: TRL per response over the generation batch, ours per token.
- old log-probs: TRL runs a no-grad policy forward in scoring (three scoring forwards: policy, reference, RM); ours
  takes them from the sampler (two: reference, RM). No RLOOConfig option skips that forward.
- the RM: TRL decodes the responses to text and re-tokenizes prompt + response (EOS dropped, right-padded); ours
  scores the sampled ids in place. The word-level tokenizer round-trips the ids exactly.
- minibatches: TRL shuffles the rollout batch once and reuses the same two minibatches in both epochs; ours draws
  a new permutation per epoch. TRL's training forward also computes the entropy (its fused LM head); ours takes the
  entropy from the sampler.
- TRL 1.x computes log-probs with its fused LM head (`trl.trainer.utils.add_fused_lm_head`: online log-sum-exp over
  logit tiles, recomputed in the backward); off CUDA it scores every position, not only the response's. There is no
  option to use the plain head; on this CPU it costs ~1.2x a plain forward, ~1.45x a plain forward + backward.
"""
from __future__ import annotations

import argparse
import collections
import functools
import tempfile
import time

from benchmarks import common

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import ppo_iteration  # noqa: E402
from benchmarks.ppo_iteration import word_tokenizer  # noqa: E402
from rlhf_jax import hf_import, model, optimizer, ppo, stages  # noqa: E402

PAD, EOS = 0, 1  # word_tokenizer's ids; prompts use ids 2 .. vocab - 2
KL_COEF, LR = 0.05, 1e-5


def hyper(epochs: int, minibatches: int, group: int) -> ppo.Hyper:
  """RLOO settings shared with the TRL run (k1 KL, γ=1, clip 0.2, whitened advantages, no ptx, no critic)."""
  return ppo.Hyper(kl_estimator="k1", gamma=1.0, lam=1.0, clip_eps=0.2, vf_clip=0.2, vf_coef=0.5, ptx_coef=0.0,
                   whiten_advantages=True, ppo_epochs=epochs, minibatches=minibatches, group_size=group)


def adamw(updates: int):
  """Our optimizer set as TRL's default AdamW: lr 1e-5 decaying linearly, β2 0.999, no weight decay, clip 1."""
  opt = optimizer.default_config(lr=LR)
  opt.update(schedule="linear", warmup_steps=0, b2=0.999, weight_decay=0.0)
  return optimizer.make_optimizer(opt, updates)


def ours_runner(cfg, policy, reward, rows_BxP, new_tokens: int, hp: ppo.Hyper, iters: int):
  """(run(n), out) of ppo_iteration.ours_runner without a critic, with TRL's optimizer and EOS; rows_BxP: each prompt
  G times on consecutive rows, as in ppo.run."""
  return ppo_iteration.ours_runner(cfg, policy, reward, rows_BxP, new_tokens, hp, critic=False,
                                   tx=adamw(iters * hp.ppo_epochs * hp.minibatches), eos_id=EOS, kl_coef=KL_COEF)


def _timed(fn, phases: dict, key, counts: dict | None = None):
  """fn wrapped to add its wall seconds to phases[key(args)] (key None: not counted, e.g. a training forward)."""
  @functools.wraps(fn)
  def wrapper(*a, **k):
    name = key(*a, **k)
    t0 = time.perf_counter()
    try:
      result = fn(*a, **k)
    finally:
      if name is not None:
        phases[name] += time.perf_counter() - t0
    if counts is not None:  # _generate: (prompt_ids, completion_ids, completions)
      counts["response"] += sum(len(ids) for ids in result[1])
    return result
  return wrapper


def trl_iterations(cfg, policy, reward, prompts_NxP, new_tokens: int, hp: ppo.Hyper, iters: int,
                   between=lambda: None) -> dict:
  """Runs 1 + iters RLOO iterations of TRL's RLOOTrainer.train(); phase seconds from its wrapped generation,
  scoring, no-grad forwards and reward calls, iterations from a step-end callback (update = iteration - generation
  - scoring). between() runs after each iteration, outside its timing (our next iteration: ABAB)."""
  torch = common.torch_setup()
  import datasets
  import transformers
  import trl
  from trl import RLOOConfig, RLOOTrainer
  print(f"TRL {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
  policy_dir, reward_dir = tempfile.mkdtemp(prefix="bench_policy_"), tempfile.mkdtemp(prefix="bench_reward_")
  hf_import.save_hf_checkpoint(cfg, policy, policy_dir)
  hf_import.save_hf_checkpoint(cfg, reward["backbone"], reward_dir)
  no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dtype=torch.float32)
  lm = transformers.GPT2LMHeadModel.from_pretrained(policy_dir, **no_dropout)
  reward_model = transformers.GPT2ForSequenceClassification.from_pretrained(reward_dir, num_labels=1, **no_dropout)
  # our ScalarHead kernel (D, 1) -> HF score.weight (1, D)
  reward_model.score.weight.data = torch.from_numpy(np.array(reward["head"]["dense"]["kernel"]).T.copy())
  tok = word_tokenizer(cfg.vocab_size)
  tok.padding_side = "left"
  G, rows = hp.group_size, prompts_NxP.shape[0] * hp.group_size
  steps = hp.ppo_epochs * hp.minibatches  # optimizer steps per rollout batch
  args = RLOOConfig(
      output_dir=tempfile.mkdtemp(prefix="bench_trl_"), num_generations=G, per_device_train_batch_size=rows //
      hp.minibatches, gradient_accumulation_steps=1, steps_per_generation=hp.minibatches,
      num_iterations=hp.ppo_epochs, max_steps=steps * (iters + 1), max_completion_length=new_tokens,
      temperature=1.0, top_k=0, top_p=1.0, beta=KL_COEF, epsilon=hp.clip_eps,
      normalize_advantages=hp.whiten_advantages, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
      weight_decay=0.0, max_grad_norm=1.0, shuffle_dataset=False, gradient_checkpointing=False, disable_dropout=True,
      bf16=False, use_cpu=True, seed=0, report_to="none", save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True,
      dataloader_drop_last=True)
  # the same N prompts every iteration, as ours; a trailing space so that TRL's prompt + completion text keeps the
  # word boundary for the reward model's re-tokenization
  texts = [" ".join(f"t{i}" for i in row) + " " for row in prompts_NxP]
  dataset = datasets.Dataset.from_dict({"prompt": texts * (iters + 1)})
  phases, counts = collections.defaultdict(float), collections.defaultdict(int)
  out = collections.defaultdict(list)
  marks = [0.0, 0.0]

  class Timer(transformers.TrainerCallback):
    def on_step_end(self, unused_args, state, *unused, **unused_kwargs):
      if state.global_step % steps:
        return
      now, cpu_now = time.perf_counter(), time.process_time()
      total = now - marks[0]
      scoring = phases["generate_and_score"] - phases["generation"]
      for k, v in (("generation", phases["generation"]), ("scoring", scoring),
                   ("update", total - phases["generate_and_score"]), ("cpu", cpu_now - marks[1]),
                   ("policy_forward", phases["policy"]), ("ref_forward", phases["ref"]),
                   ("reward", phases["reward"]), ("tokens", prompts_NxP.size * G + counts["response"]),
                   ("response", counts["response"]), ("kl", trainer._metrics["train"]["kl"][-1])):
        out[k].append(v)
      phases.clear()
      counts.clear()
      between()
      marks[0], marks[1] = time.perf_counter(), time.process_time()

  trainer = RLOOTrainer(model=lm, reward_funcs=reward_model, args=args, train_dataset=dataset,
                        processing_class=tok, reward_processing_classes=tok, callbacks=[Timer()])

  def forward_key(model, *unused, **unused_kwargs):  # no-grad scoring forwards only; training forwards: update
    if torch.is_grad_enabled():
      return None
    return "ref" if model is trainer.ref_model else "policy"

  trainer._generate = _timed(trainer._generate, phases, lambda *a, **k: "generation", counts)
  trainer._generate_and_score_completions = _timed(trainer._generate_and_score_completions, phases,
                                                   lambda *a, **k: "generate_and_score")
  trainer._get_per_token_logps_and_entropies = _timed(trainer._get_per_token_logps_and_entropies, phases,
                                                      forward_key)
  trainer._calculate_rewards = _timed(trainer._calculate_rewards, phases, lambda *a, **k: "reward")
  marks[0], marks[1] = time.perf_counter(), time.process_time()
  trainer.train()
  print("TRL iterations (s): " + ", ".join(f"{k} {' '.join(f'{x:.3f}' for x in out[k])}"
                                        for k in ("generation", "scoring", "update", "cpu")), flush=True)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prompts", type=int, default=8, help="distinct prompts per rollout batch")
  ap.add_argument("--group", type=int, default=4, help="G: responses per prompt (TRL num_generations)")
  ap.add_argument("--prompt", type=int, default=32)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--epochs", type=int, default=2, help="passes over each rollout batch (TRL num_iterations)")
  ap.add_argument("--minibatches", type=int, default=2, help="per epoch (TRL steps_per_generation)")
  ap.add_argument("--iters", type=int, default=4, help="timed iterations after the first (compile) one")
  ap.add_argument("--order", choices=("abab", "halves"), default="abab",
                  help="abab: one of our iterations after each of TRL's; halves: half of ours before TRL's, half after")
  args = ap.parse_args()
  rows = args.prompts * args.group
  common.header(f"RLOO iteration: GPT-2 D=256 L=6 H=8 vocab {args.vocab} policy/reference/reward, no critic, "
                f"{args.prompts} prompts x G={args.group} = {rows} responses, {args.prompt} -> {args.new} tokens, "
                f"k1 KL beta {KL_COEF}, {args.epochs} epochs x {args.minibatches} minibatches of "
                f"{rows // args.minibatches}")
  cfg = common.gpt2_config(vocab=args.vocab, max_len=256)
  policy = model.init_params(cfg, jax.random.PRNGKey(0))
  reward = stages.fresh_reward_params(cfg, jax.random.PRNGKey(1))
  prompts_NxP = np.random.default_rng(0).integers(2, args.vocab - 1, (args.prompts, args.prompt), dtype=np.int32)
  hp = hyper(args.epochs, args.minibatches, args.group)
  run_ours, ours = ours_runner(cfg, policy, reward, np.repeat(prompts_NxP, args.group, axis=0), args.new, hp,
                               args.iters + 1)
  abab = args.order == "abab"
  run_ours(1 if abab else 1 + args.iters // 2)  # compiles
  print(f"ours: compiled in {ours['generation'][0] + ours['scoring'][0] + ours['update'][0]:.1f} s, "
        f"{common.load()}", flush=True)
  try:
    trl = trl_iterations(cfg, policy, reward, prompts_NxP, args.new, hp, args.iters,
                         between=lambda: run_ours(1) if abab and len(ours["cpu"]) <= args.iters else None)
  except Exception as e:  # noqa: BLE001 (show exactly why the peer cannot run, then report ours alone)
    print(f"TRL RLOOTrainer failed: {type(e).__name__}: {e}")
    trl = None
  run_ours(1 + args.iters - len(ours["cpu"]))
  print(f"results ({common.load()}):")
  ours_rate = ppo_iteration.report("ours", ours, "reference + RM forwards")
  if trl is not None:
    detail = (f"policy {common.med(trl['policy_forward'][1:]):.3f} + reference "
              f"{common.med(trl['ref_forward'][1:]):.3f} + RM {common.med(trl['reward'][1:]):.3f} s")
    ppo_iteration.print_ratios(ours, ours_rate, trl, ppo_iteration.report("TRL", trl, detail), "TRL RLOOTrainer")


if __name__ == "__main__":
  main()
