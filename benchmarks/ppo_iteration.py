"""PPO iteration (rollout + reward + reference + value + update): ours (sampling.make_sampler, ppo.score_rollout,
ppo.ppo_update, each under parallel.jit on the data-parallel mesh) vs TRL 0.29's PPOTrainer (trl.experimental.ppo), same GPT-2 policy /
reward / value sizes (D=256 L=6 H=8 vocab 8192), 32 prompts of 32 tokens -> 64 response tokens, 2 PPO epochs x 2
minibatches of 16, no ptx (TRL has none). Half of our timed iterations run before TRL's and half after. Prints
prompt+response tokens/s, the split generation / scoring / update times, and ours / TRL (target >= 3).

Command: .venv-bench/bin/python -m benchmarks.ppo_iteration [--iters 4]
"""
from __future__ import annotations

import argparse
import collections
import functools
import tempfile
import time

from benchmarks import common

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import hf_import, model, optimizer, parallel, ppo, sampling, stages  # noqa: E402

PAD = 0


def hyper(epochs: int, minibatches: int) -> ppo.Hyper:
  """PPO settings shared with the TRL run (k1 KL, γ=1, λ=0.95, clip 0.2, vf 0.5, whitened advantages)."""
  return ppo.Hyper(kl_estimator="k1", gamma=1.0, lam=0.95, clip_eps=0.2, vf_clip=0.2, vf_coef=0.5, ptx_coef=0.0,
                   whiten_advantages=True, ppo_epochs=epochs, minibatches=minibatches)


def ours_runner(cfg, policy, reward, prompts_BxP, new_tokens: int, hp: ppo.Hyper, *, critic: bool = True,
                tx=None, eos_id: int | None = None, kl_coef: float = 0.05):
  """(run(n), out): run(n) does n more iterations of our PPO pieces, appending per-iteration phase seconds, CPU
  seconds, token counts and KL per response token to out (the first iteration compiles). critic=False: no value
  network (RLOO, hp.group_size > 1); tx defaults to AdamW lr 1e-5, eos_id to the last vocabulary id."""
  models = ppo.Models(cfg, cfg, cfg)
  tx = tx or optimizer.make_optimizer(optimizer.default_config(lr=1e-5), 1000)
  trainable = ppo.Trainable(policy=policy, value=reward if critic else None)
  mesh = parallel.make_mesh()  # data parallel over the local devices, every network replicated
  state = ppo.PPOState(jnp.int32(0), trainable, tx.init(trainable), jax.random.PRNGKey(0))
  state_sh = parallel.state_shardings(mesh, state, None)
  held = {"state": parallel.shard_tree(state, state_sh)}
  frozen = ppo.Frozen(ref=policy, reward=reward)
  frozen_R = parallel.shard_tree(frozen, parallel.state_shardings(mesh, frozen, None))
  kl_R, offset_R = np.float32(kl_coef), np.float32(0.0)
  sampler = sampling.make_sampler(mesh, cfg, max_new_tokens=new_tokens,
                                  eos_id=cfg.vocab_size - 1 if eos_id is None else eos_id, pad_id=PAD)
  p_score, p_update = ppo.compile_steps(mesh, state_sh, tx, models, hp)
  sharded = parallel.put_batch(mesh, {"tokens": prompts_BxP, "mask": np.ones_like(prompts_BxP)})
  out = collections.defaultdict(list)

  def run(n: int) -> None:
    for _ in range(n):
      it = len(out["cpu"])
      rngs = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(1), it), 1)[0]
      c0, t0 = time.process_time(), time.perf_counter()
      samples = jax.block_until_ready(sampler(held["state"].params.policy, sharded["tokens"], sharded["mask"], rngs))
      t1 = time.perf_counter()
      rollout, sums = jax.block_until_ready(p_score(held["state"].params, frozen_R, samples, kl_R, offset_R))
      t2 = time.perf_counter()
      held["state"], update_sums = p_update(held["state"], rollout, None)
      jax.block_until_ready(update_sums)
      t3 = time.perf_counter()
      response = int(np.sum(samples.lengths_B))
      for k, v in (("generation", t1 - t0), ("scoring", t2 - t1), ("update", t3 - t2),
                   ("cpu", time.process_time() - c0), ("tokens", prompts_BxP.size + response), ("response", response),
                   ("kl", float(sums["kl"][0]) / response)):  # per response token, as TRL's metric
        out[k].append(v)

  return run, out


def word_tokenizer(vocab: int):
  """A PreTrainedTokenizerFast over ids 0..vocab-1 (pad 0, eos 1), built in memory: TRL needs a tokenizer."""
  import tokenizers
  import transformers
  names = ["<pad>", "<eos>", "<unk>"] + [f"t{i}" for i in range(3, vocab)]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                              unk_token="<unk>")


def trl_iterations(cfg, policy, reward, prompts_BxP, new_tokens: int, hp: ppo.Hyper, iters: int) -> dict:
  """Runs 1 + iters iterations of TRL's PPOTrainer.train(); phase seconds from wrapped generation / no-grad
  forwards and a step-end callback (update = iteration - generation - scoring)."""
  torch = common.torch_setup()
  import datasets
  import transformers
  from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer
  policy_dir, reward_dir = tempfile.mkdtemp(prefix="bench_policy_"), tempfile.mkdtemp(prefix="bench_reward_")
  hf_import.save_hf_checkpoint(cfg, policy, policy_dir)
  hf_import.save_hf_checkpoint(cfg, reward["backbone"], reward_dir)
  lm = functools.partial(transformers.GPT2LMHeadModel.from_pretrained, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, dtype=torch.float32)
  seq_cls = functools.partial(transformers.GPT2ForSequenceClassification.from_pretrained, reward_dir, num_labels=1,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dtype=torch.float32)
  reward_model, value_model = seq_cls(), seq_cls()
  for m in (reward_model, value_model):  # our ScalarHead kernel (D, 1) -> HF score.weight (1, D)
    m.score.weight.data = torch.from_numpy(np.array(reward["head"]["dense"]["kernel"]).T.copy())
  n = prompts_BxP.shape[0]
  args = PPOConfig(
      output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=n, gradient_accumulation_steps=1,
      num_mini_batches=hp.minibatches, num_ppo_epochs=hp.ppo_epochs, response_length=new_tokens,
      total_episodes=n * (iters + 1), local_rollout_forward_batch_size=n, num_sample_generations=0,
      report_to="none", save_strategy="no", logging_steps=10 ** 6, temperature=1.0, missing_eos_penalty=None,
      stop_token=None, use_cpu=True, kl_coef=0.05, kl_estimator="k1", vf_coef=hp.vf_coef, cliprange=hp.clip_eps,
      cliprange_value=hp.vf_clip, gamma=hp.gamma, lam=hp.lam, learning_rate=1e-5, seed=0, bf16=False,
      dataloader_drop_last=True)
  phases = {"generation": 0.0, "scoring": 0.0}

  def timed_phase(fn, phase):
    @functools.wraps(fn)
    def wrapper(*a, **k):
      if torch.is_grad_enabled():  # training forward: part of the update
        return fn(*a, **k)
      t0 = time.perf_counter()
      try:
        return fn(*a, **k)
      finally:
        phases[phase] += time.perf_counter() - t0
    return wrapper

  ppo_trainer.batch_generation = timed_phase(ppo_trainer.batch_generation, "generation")
  ppo_trainer.forward = timed_phase(ppo_trainer.forward, "scoring")
  ppo_trainer.get_reward = timed_phase(ppo_trainer.get_reward, "scoring")
  out = {"generation": [], "scoring": [], "update": [], "tokens": [], "response": [], "cpu": []}
  marks = [0.0, 0.0]

  class Timer(transformers.TrainerCallback):
    def on_step_end(self, *unused_args, **unused_kwargs):
      now, cpu_now = time.perf_counter(), time.process_time()
      total, marks[0] = now - marks[0], now
      out["cpu"].append(cpu_now - marks[1])
      marks[1] = cpu_now
      out["generation"].append(phases["generation"])
      out["scoring"].append(phases["scoring"])
      out["update"].append(total - phases["generation"] - phases["scoring"])
      out["tokens"].append(prompts_BxP.size + n * new_tokens)
      out["response"].append(n * new_tokens)
      phases.update(generation=0.0, scoring=0.0)

  trainer = PPOTrainer(args=args, processing_class=word_tokenizer(cfg.vocab_size), model=lm(policy_dir),
                       ref_model=lm(policy_dir), reward_model=reward_model, value_model=value_model,
                       train_dataset=datasets.Dataset.from_dict({"input_ids": prompts_BxP.tolist()}),
                       callbacks=[Timer()])
  marks[0], marks[1] = time.perf_counter(), time.process_time()
  trainer.train()
  return out


def report(name: str, r: dict, scoring_detail: str = "ref/value/reward forwards") -> tuple[float, float]:
  """Prints one side's phase medians (first iteration excluded); returns median tokens per wall and CPU second."""
  it = [g + s + u for g, s, u in zip(r["generation"], r["scoring"], r["update"])]
  steady = slice(1, None)
  rate = float(np.median([t / s for t, s in zip(r["tokens"][steady], it[steady])]))
  cpu_rate = float(np.median([t / c for t, c in zip(r["tokens"][steady], r["cpu"][steady])]))
  kl = f"mean KL/token {np.mean(r['kl'][steady]):.4f}; " if r.get("kl") else ""
  print(f"  {name:5s} iteration wall {common.spread(it[steady])}, CPU {common.med(r['cpu'][steady]):.2f} s; "
        f"first iteration (incl. compile / trainer setup) {it[0]:.1f} s")
  print(f"        generation {common.med(r['generation'][steady]):.3f} s, scoring "
        f"{common.med(r['scoring'][steady]):.3f} s ({scoring_detail}), update {common.med(r['update'][steady]):.3f} s; response tokens "
        f"{r['response'][steady]}; {kl}{rate:.0f} prompt+response tokens/s", flush=True)
  return rate, cpu_rate


def print_ratios(ours: dict, ours_rate: tuple, peer: dict, peer_rate: tuple, peer_name: str, target: str = ""):
  """The RATIO line (tokens/s, wall and CPU, from `report`'s rates) and TRL / ours per phase (first iteration out)."""
  print(f"RATIO ours / {peer_name} prompt+response tokens/s = {ours_rate[0] / peer_rate[0]:.2f} wall, "
        f"{ours_rate[1] / peer_rate[1]:.2f} CPU{target}")
  for phase in ("generation", "scoring", "update"):
    print(f"  phase ratio TRL / ours {phase}: {common.med(peer[phase][1:]) / common.med(ours[phase][1:]):.2f}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.generation_args(ap)
  ap.add_argument("--iters", type=int, default=4, help="timed iterations after the first (compile) one")
  args = ap.parse_args()
  common.header(f"PPO iteration: GPT-2 D=256 L=6 H=8 vocab {args.vocab} policy/value/reward/reference, "
                f"{args.batch} prompts x {args.prompt} -> {args.new} tokens, 2 epochs x 2 minibatches")
  cfg = common.gpt2_config(vocab=args.vocab, max_len=256)
  policy = model.init_params(cfg, jax.random.PRNGKey(0))
  reward = stages.fresh_reward_params(cfg, jax.random.PRNGKey(1))
  prompts_BxP = np.random.default_rng(0).integers(2, args.vocab - 1, (args.batch, args.prompt), dtype=np.int32)
  hp = hyper(2, 2)
  run_ours, ours = ours_runner(cfg, policy, reward, prompts_BxP, args.new, hp)
  run_ours(1 + args.iters // 2)  # half of our timed iterations before TRL's, half after: load drift hits both
  print(f"ours: {len(ours['cpu'])} iterations, {common.load()}", flush=True)
  try:
    trl = trl_iterations(cfg, policy, reward, prompts_BxP, args.new, hp, args.iters)
  except Exception as e:  # noqa: BLE001 (show exactly why the peer cannot run, then report ours alone)
    print(f"TRL PPOTrainer failed: {type(e).__name__}: {e}")
    trl = None
  run_ours(args.iters - args.iters // 2)
  print(f"results ({common.load()}):")
  ours_rate = report("ours", ours)
  if trl is not None:
    print_ratios(ours, ours_rate, trl, report("TRL", trl), "TRL", "  (target >= 3)")


if __name__ == "__main__":
  main()
