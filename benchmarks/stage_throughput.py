"""SFT and reward-model throughput in non-pad tokens/s against packed pretraining, on the embedded task's data
through our loaders (data.make_lm_loader / make_sft_loader / make_comparison_loader) and the real compiled
trainer.train_step (lm_loss, reward_loss), GPT-2 shape D=256 L=6 H=8, the task's 512-piece BPE tokenizer,
16 rows x L tokens per step for every stage (RM: 4 elements of K=4 rows, records packed several per element as
the loader does by default), the RM in the padded layout (pack=False: one record per element, response k in row
k) and padded with L cut to its longest record (rows raised to keep rows x L). Each step includes fetching the
loader's next batch, as train_loop does. Prints SFT/pretrain and RM/pretrain (target >= 0.8 each).

Command: .venv-bench/bin/python -m benchmarks.stage_throughput [--seq 128] [--reps 5]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile

from benchmarks import common

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import data, losses, model, optimizer, parallel, rankings, stages, tasks, trainer  # noqa: E402
from rlhf_jax.tokenizer import train_tokenizer  # noqa: E402


def task_files(out_dir: str) -> dict[str, str]:
  """Corpus, demonstrations and K=4 comparisons (reference answer + 3 degraded ones, oracle-ranked)."""
  cfg = tasks.TaskConfig(num_corpus_docs=2000, num_demonstrations=1000)
  paths = tasks.generate_all(cfg, out_dir)
  prompts, candidates = [], []
  with open(paths["demonstrations"]) as f:
    for line in f:
      prompt = json.loads(line)["prompt"]
      best = tasks.reference_answer(prompt)
      prompts.append(prompt)
      candidates.append([best, best[::-1] + " ", best[: max(1, len(best) // 2)], best + " " + best])
  paths["comparisons"] = tasks.write_comparisons(os.path.join(out_dir, "comparisons.jsonl"),
                                                 rankings.make_comparisons(prompts, candidates, cfg))
  return paths


def longest_comparison(path: str, tok) -> int:
  """Tokens in the longest [bos] + prompt + response + [eos] of a comparisons file."""
  longest = 0
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      longest = max(longest, 2 + len(tok.encode(r["prompt"])) + max(len(tok.encode(x)) for x in r["responses"]))
  return longest


def stage_step(loss_fn, params, loader):
  """(step() -> non-pad tokens, compile_s): next loader batch + one trainer.train_step on the data-parallel mesh."""
  tx = optimizer.make_optimizer(optimizer.default_config(), 1000)
  mesh = parallel.make_mesh()
  state = trainer.create_state(params, tx, 0)
  state_sh = parallel.state_shardings(mesh, state, None)
  p_train, _ = trainer.compile_steps(loss_fn, mesh, state_sh)
  holder = {"state": parallel.shard_tree(state, state_sh), "tokens": []}

  def step():
    batch = next(loader)
    holder["state"], sums = p_train(holder["state"], parallel.put_batch(mesh, batch))
    jax.block_until_ready(sums)
    holder["tokens"].append(data.num_tokens(batch))

  return step, common.timed(step), holder["tokens"]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seq", type=int, default=128, help="row length L of every stage (the stage configs' default)")
  ap.add_argument("--rows", type=int, default=16, help="rows per step (RM: rows / 4 prompts)")
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  common.header(f"stage throughput: GPT-2 D=256 L=6 H=8, {args.rows} rows x {args.seq} tokens per step")
  work = tempfile.mkdtemp(prefix="bench_stages_")
  paths = task_files(os.path.join(work, "data"))
  tok = train_tokenizer(paths["corpus"], os.path.join(work, "tok", "spm"), 512, "bpe")
  cfg = common.gpt2_config(vocab=tok.vocab_size, max_len=args.seq)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  lm_fn = functools.partial(losses.lm_loss, cfg=cfg)
  loaders = {
      "pretrain (packed)": (lm_fn, params, data.make_lm_loader(paths["corpus"], tok, args.seq, args.rows, 0, work)),
      "SFT (packed)": (lm_fn, params, data.make_sft_loader(paths["demonstrations"], tok, args.seq, args.rows, 0,
                                                           work))}
  rm = (functools.partial(losses.reward_loss, cfg=cfg), stages.fresh_reward_params(cfg, jax.random.PRNGKey(1),
                                                                                    backbone=params))
  comparisons = functools.partial(data.make_comparison_loader, paths["comparisons"], tok, max_responses=4, seed=0,
                                  workdir=work)
  loaders["RM packed"] = rm + (comparisons(seq_len=args.seq, batch_size=args.rows // 4),)
  loaders["RM padded"] = rm + (comparisons(seq_len=args.seq, batch_size=args.rows // 4, pack=False),)
  tight = -(-longest_comparison(paths["comparisons"], tok) // 8) * 8
  prompts = max(1, args.rows * args.seq // tight // 4)
  loaders[f"RM padded, L={tight}"] = rm + (comparisons(seq_len=tight, batch_size=prompts, pack=False),)
  print(f"RM tight rows: longest comparison {tight} tokens -> {prompts} prompts x 4 x {tight} per step")
  fns, counts = {}, {}
  for name, (loss_fn, p, loader) in loaders.items():
    fns[name], compile_s, counts[name] = stage_step(loss_fn, p, loader)
    print(f"{name}: compile {compile_s:.1f} s", flush=True)
  times, cpu = common.interleaved(fns, args.reps)
  rates, cpu_rates = {}, {}
  for name, ts in times.items():
    tokens = counts[name][-len(ts):]
    rates[name] = float(np.median([n / t for n, t in zip(tokens, ts)]))
    cpu_rates[name] = float(np.median([n / t for n, t in zip(tokens, cpu[name])]))
    print(f"  {name:20s} wall {common.spread(ts)}, CPU {common.med(cpu[name]):.3f} s  non-pad "
          f"{np.mean(tokens) / (args.rows * args.seq):.0%} of slots  {rates[name]:6.0f} non-pad tokens/s")
  base = rates["pretrain (packed)"]
  print(f"RATIO SFT / pretrain non-pad tokens/s = {rates['SFT (packed)'] / base:.2f} wall, "
        f"{cpu_rates['SFT (packed)'] / cpu_rates['pretrain (packed)']:.2f} CPU  (target >= 0.80)")
  for name in list(rates)[2:]:
    print(f"RATIO {name} / pretrain non-pad tokens/s = {rates[name] / base:.2f} wall, "
          f"{cpu_rates[name] / cpu_rates['pretrain (packed)']:.2f} CPU  (target >= 0.80)")
  print(common.load())


if __name__ == "__main__":
  main()
