"""The whole InstructGPT pipeline on the embedded task, in one workdir, resumable stage by stage.

task data -> tokenizer -> pretrain -> SFT -> comparisons of SFT samples ranked by the (noisy) oracle ->
reward model -> PPO-ptx -> held-out evaluation of every policy -> table, plots, report.md.
Each training stage runs through its own experiment's library function (`stages.run_lm`, `stages.run_reward`,
`ppo.run`) with that experiment's config, into `workdir/<stage>`; a finished stage is skipped on re-run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import evaluate, lora, metrics, parallel, ppo, rankings, stages, tasks
from rlhf_jax.tokenizer import train_tokenizer


def _stage(steps: int, lr: float, batch_size: int, seq_len: int, warmup: int = 20) -> ml_collections.ConfigDict:
  """A stage's data/opt/train overrides."""
  return ml_collections.ConfigDict({
      "data": {"batch_size": batch_size, "seq_len": seq_len},
      "opt": {"lr": lr, "warmup_steps": warmup},
      "train": {"num_steps": steps, "log_every": 25, "eval_every": 0, "checkpoint_every": steps},
      "lora": lora.config().to_dict()})  # --config.sft.lora.rank=8: adapters on the previous stage's model


ORACLE_SCALE = 4.0  # oracle reward = ORACLE_SCALE x score in [0, 1]: a spread like the RM's scores


def oracle_reward(prompts: list[str], responses: list[str]) -> np.ndarray:
  """PPO reward from the task oracle itself (`rl_reward="oracle"`): ORACLE_SCALE x oracle score per response."""
  return ORACLE_SCALE * np.array([tasks.oracle_score(p, r) for p, r in zip(prompts, responses)], np.float32)


def config() -> ml_collections.ConfigDict:
  """The pipeline's config: task, model/tokenizer, each stage's data/opt/train, comparisons, ppo, eval."""
  cfg = ml_collections.ConfigDict()
  cfg.task = ml_collections.ConfigDict(dict(  # rlhf_jax.tasks.TaskConfig fields
      seed=0,  # every generated file is a function of this seed
      num_corpus_docs=12000,  # pretraining documents
      num_demonstrations=8000,  # labeler (prompt, response) pairs for SFT (2000: SFT greedy 0.64 instead of 0.79)
      num_rl_prompts=12800,  # PPO prompts (no other stage trains on them): 60 iterations x 64 prompts use 3840
      num_heldout_prompts=200,  # evaluation prompts (no stage trains on them)
      num_comparison_prompts=8000,   # the RM's own train-split prompts, ranked before the demonstrations' prompts
      demo_error_rate=0.25,  # share of wrong demonstrations (writing is hard)
      comparison_noise_rate=0.1,  # chance a ranking has one adjacent pair swapped (comparing is easier)
      num_candidates=4))  # K SFT samples per comparison prompt
  cfg.model = stages.model_config()  # the pretrained model (later stages inherit it)
  cfg.model.d_model, cfg.model.num_heads, cfg.model.num_kv_heads = 128, 4, 4
  cfg.model.d_ff, cfg.model.num_layers, cfg.model.max_len = 512, 3, 64
  cfg.tokenizer = ml_collections.ConfigDict(dict(
      vocab_size=512,  # upper bound for char models (they take what the corpus has)
      model_type="bpe"))  # sentencepiece model type: bpe | unigram | char | word
  cfg.pretrain = _stage(steps=500, lr=2e-3, batch_size=32, seq_len=64)  # next-token on the corpus
  cfg.sft = _stage(steps=800, lr=1e-3, batch_size=32, seq_len=64)  # demonstrations, loss on responses
  cfg.comparisons = ml_collections.ConfigDict(dict(
      num_prompts=4000,  # prompts whose K SFT samples are ranked for RM training (was 8000; 200 RM steps x 16
      #                    records use 3200)
      num_heldout=200,  # held-out prompts ranked the same way for the RM's held-out accuracy
      temperature=1.0))  # sampling temperature of the candidates
  cfg.reward = _stage(steps=200, lr=5e-4, batch_size=16, seq_len=48)  # Bradley–Terry on the comparisons (was 500)
  cfg.reward.data.max_responses = 0  # Kmax, rows of a packed batch element; 0 = task.num_candidates
  cfg.reward.loss = ml_collections.ConfigDict(dict(
      lm_coef=1.0,  # + next-token loss on each best response (keeps the likelihood feature a language model)
      loglik_feature=True,  # score += a · log π_backbone(response | prompt), a learned (off: 0.70 vs 0.80-0.83)
      token_head=False))  # score += Σ_t u(h_t) over the response tokens
  cfg.rl = _stage(steps=60, lr=1e-4, batch_size=16, seq_len=64, warmup=20)  # PPO: num_steps = iterations (was 100)
  cfg.rl.data = ml_collections.ConfigDict(dict(
      prompt_len=16,  # P, prompts left-padded to this many tokens (the task's longest: 16 with bos at vocab 512)
      ptx_seq_len=64,  # packed pretraining rows for the ptx term
      ptx_batch_size=16))  # ptx rows per PPO iteration
  cfg.rl.train.log_every = 10
  cfg.rl_reward = "rm"  # PPO's reward: the trained RM, or "oracle" (ORACLE_SCALE x the task oracle: the ceiling an RM
  #                       could give this policy; the RM then only initialises a value network, if any)
  cfg.ppo = ppo.ppo_config()  # the PPO knobs: --config.ppo.kl_coef=0, --config.ppo.ptx_coef=0, ...
  cfg.ppo.adaptive_kl = True  # β adapts towards kl_target (a weak RM is otherwise over-optimised)
  cfg.ppo.kl_coef = 0.3  # initial β (fixed 0.1 and 0.3 measured alike: BENCHMARKS.md)
  cfg.ppo.kl_target = 1.0  # nats per response (the 0.70 RM was exploited beyond ~1 nat: BENCHMARKS.md)
  cfg.ppo.kl_horizon = 10000  # samples: β changes by at most 0.26% per iteration of 128
  cfg.ppo.max_new_tokens = 12  # the longest demonstration: 10 tokens with eos
  cfg.ppo.rollout_batch = 256  # 64 prompts x group_size (64 x 4 epochs at lr 1e-4: KL spent on noise, BENCHMARKS.md)
  cfg.ppo.group_size = 4  # RLOO: leave-one-out baseline over 4 samples per prompt, no value network (GAE with a
  #                         critic, group_size=1, measured alike at 1.7x the time per iteration: BENCHMARKS.md)
  cfg.ppo.ppo_epochs = 2
  cfg.ppo.ptx_coef = 0.05  # γ: SFT left the corpus loss high, and γ = 1 then dominates the RL gradient
  cfg.ppo.sample_every = 20
  cfg.eval = ml_collections.ConfigDict(dict(
      num_prompts=200,  # held-out prompts per policy
      samples_per_prompt=4,  # temperature-1 samples per prompt (sampled metrics, RM score, KL are their means)
      seed=0))  # sampling seed of the evaluation
  cfg.mesh = parallel.mesh_config()  # every stage's device mesh (and the evaluation's)
  return cfg


def _stage_cfg(base: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A stage's own config (its experiment's get_config()) with the pipeline's groups laid over it."""
  cfg = ml_collections.ConfigDict(base.to_dict())
  for group, values in overrides.items():
    if isinstance(values, ml_collections.ConfigDict):
      cfg[group].update(values.to_dict())
    else:
      cfg[group] = values
  return cfg


def _task_data(cfg, workdir: str) -> tuple[tasks.TaskConfig, dict]:
  """Generates the task files once (deterministic for the task config); returns the config and paths."""
  task_cfg = tasks.TaskConfig(**cfg.task.to_dict())
  out = os.path.join(workdir, "data")
  marker = os.path.join(out, "task_config.json")
  paths = {k: os.path.join(out, f) for k, f in (("corpus", "corpus.txt"), ("demonstrations", "demonstrations.jsonl"),
                                                ("rl_prompts", "rl_prompts.jsonl"),
                                                ("heldout_prompts", "heldout_prompts.jsonl"),
                                                ("comparison_prompts", "comparison_prompts.jsonl"))}
  want = json.dumps(dataclasses.asdict(task_cfg), sort_keys=True)
  if not (os.path.exists(marker) and open(marker).read().strip() == want):
    paths.update(tasks.generate_all(task_cfg, out))
  return task_cfg, paths


def comparison_prompts(cfg, paths: dict, split: str) -> list[str]:
  """The prompts whose SFT samples are ranked: "train", the RM's own prompts (task.num_comparison_prompts) then the
  demonstrations' prompts, distinct, up to comparisons.num_prompts; "heldout", comparisons.num_heldout held-out."""
  sources = ([paths["comparison_prompts"], paths["demonstrations"]] if split == "train" else [paths["heldout_prompts"]])
  prompts = list(dict.fromkeys(json.loads(line)["prompt"] for source in sources for line in open(source)))
  return prompts[:cfg.comparisons.num_prompts if split == "train" else cfg.comparisons.num_heldout]


def _comparisons(cfg, workdir, task_cfg, paths, sft_dir: str, split: str) -> str:
  """K SFT samples per prompt ranked by the noisy oracle (`rankings.comparison_candidates`: empty answers and equal
  oracle scores dropped, so every pair has a true preference up to the label noise)."""
  path = os.path.join(workdir, "data", f"comparisons_{split}.jsonl")
  if os.path.exists(path):
    return path
  prompts = comparison_prompts(cfg, paths, split)
  model, params, tok = stages.load_policy(sft_dir)
  K = task_cfg.num_candidates
  texts, _ = evaluate.generate(params, model, tok, [p for p in prompts for _ in range(K)],
                               prompt_len=cfg.rl.data.prompt_len, max_new_tokens=cfg.ppo.max_new_tokens,
                               greedy=False, temperature=cfg.comparisons.temperature, seed=7 if split == "train" else 8,
                               mesh=parallel.make_mesh(cfg.mesh))
  rng = np.random.default_rng([task_cfg.seed, 7 if split == "train" else 8])
  records = []
  for i, prompt in enumerate(prompts):
    candidates = rankings.comparison_candidates(prompt, texts[i * K:(i + 1) * K], task_cfg.fabrication_penalty)
    if len(candidates) >= 2:
      ranking = rankings.rank_responses(prompt, candidates, rng, task_cfg.comparison_noise_rate,
                                        task_cfg.fabrication_penalty)
      records.append({"prompt": prompt, "responses": candidates, "ranking": ranking})
  if not records and split == "train":
    raise ValueError(f"comparisons: for every one of {len(prompts)} prompts the {K} SFT samples scored the same "
                     f"under the oracle; nothing to rank (train SFT longer, or raise comparisons.temperature)")
  if not records:
    logging.warning("comparisons %s: no prompt had two differently scored samples; RM held-out eval skipped", split)
    return ""
  tasks.write_comparisons(path, records)
  logging.info("comparisons %s: %d of %d prompts had >= 2 distinct scores", split, len(records), len(prompts))
  return path


def _tokenizer(cfg, workdir, paths) -> str:
  path = os.path.join(workdir, "tokenizer", "tokenizer.model")
  if not os.path.exists(path):
    train_tokenizer(paths["corpus"], path[:-len(".model")], cfg.tokenizer.vocab_size, cfg.tokenizer.model_type)
  return path


def _last_eval(workdir: str, key: str) -> float | None:
  rows = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if key in r]
  return rows[-1][key] if rows else None


def oracle_metrics(prompts: list[str], responses: list[str]) -> dict:
  """The mean task-oracle score of one PPO iteration's rollouts (logged as "oracle")."""
  return {"oracle": float(np.mean([tasks.oracle_score(p, r) for p, r in zip(prompts, responses)]))}


def base_stages(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict]:
  """Task data, tokenizer, pretrain, SFT, comparisons and RM in `workdir` (each skipped when finished).

  Returns (dirs: stage -> workdir, paths: task files + "comparisons_train" / "comparisons_heldout" ("" = none))."""
  os.makedirs(workdir, exist_ok=True)
  dirs = {s: os.path.join(workdir, s) for s in ("pretrain", "sft", "reward", "ppo")}
  # ---- data and tokenizer
  task_cfg, paths = _task_data(cfg, workdir)
  tok_path = _tokenizer(cfg, workdir, paths)
  common = ml_collections.ConfigDict({"model": cfg.model, "tokenizer": {"path": tok_path}, "mesh": cfg.mesh})
  # ---- pretrain -> SFT
  stages.run_lm(_stage_cfg(stages.lm_config("pretrain"), ml_collections.ConfigDict(
      {**common, **cfg.pretrain, "data": {**cfg.pretrain.data, "train": paths["corpus"]}})), dirs["pretrain"],
      "pretrain")
  stages.run_lm(_stage_cfg(stages.lm_config("sft"), ml_collections.ConfigDict(
      {**common, **cfg.sft, "data": {**cfg.sft.data, "train": paths["demonstrations"]},
       "train": {**cfg.sft.train, "init_from": dirs["pretrain"]}})), dirs["sft"], "sft")
  # ---- comparisons of SFT samples -> reward model
  comp_train = _comparisons(cfg, workdir, task_cfg, paths, dirs["sft"], "train")
  comp_eval = _comparisons(cfg, workdir, task_cfg, paths, dirs["sft"], "heldout")  # "" = none to rank
  paths = dict(paths, comparisons_train=comp_train, comparisons_heldout=comp_eval)
  stages.run_reward(_stage_cfg(stages.reward_config(), ml_collections.ConfigDict(
      {**common, **cfg.reward, "data": {**cfg.reward.data, "train": comp_train, "eval": comp_eval,
                                        "max_responses": cfg.reward.data.max_responses or task_cfg.num_candidates,
                                        "normalize_on": paths["demonstrations"]},
       "train": {**cfg.reward.train, "init_from": dirs["sft"]}})), dirs["reward"])
  return dirs, paths


def ppo_stage_config(cfg: ml_collections.ConfigDict, dirs: dict, paths: dict) -> ml_collections.ConfigDict:
  """The PPO experiment's config with the pipeline's rl/ppo groups, from its SFT against its RM."""
  return _stage_cfg(ppo.config(), ml_collections.ConfigDict(
      {**cfg.rl, "mesh": cfg.mesh, "ppo": {**cfg.ppo, "reward_from": dirs["reward"]},
       "data": {**cfg.rl.data, "prompts": paths["rl_prompts"], "ptx": paths["corpus"]},
       "train": {**cfg.rl.train, "init_from": dirs["sft"]}}))


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) every stage, evaluates every policy on held-out prompts, writes table, plots, report."""
  t0 = time.perf_counter()
  mesh = parallel.make_mesh(cfg.mesh)  # a bad mesh fails before anything is written
  if cfg.rl_reward not in ("rm", "oracle"):
    raise ValueError(f"config rl_reward={cfg.rl_reward!r}; expected 'rm' or 'oracle'")
  dirs, paths = base_stages(cfg, workdir)
  # ---- PPO-ptx, logging the oracle score of each iteration's rollouts
  ppo.run(ppo_stage_config(cfg, dirs, paths), dirs["ppo"], extra_metrics=oracle_metrics,
          reward_fn=oracle_reward if cfg.rl_reward == "oracle" else None)
  # ---- held-out evaluation of every policy
  results = evaluate_all(cfg, workdir, dirs, paths, mesh)
  results["reward_heldout_accuracy"] = _last_eval(dirs["reward"], "eval_accuracy")
  results["minutes"] = (time.perf_counter() - t0) / 60
  write_report(workdir, dirs, results, cfg)
  return results


def heldout_prompts(cfg: ml_collections.ConfigDict, paths: dict) -> list[str]:
  """The first eval.num_prompts held-out prompts (no stage trains on them)."""
  return [json.loads(line)["prompt"] for line in open(paths["heldout_prompts"])][:cfg.eval.num_prompts]


def evaluate_all(cfg, workdir: str, dirs: dict, paths: dict, mesh=None) -> dict:
  """Held-out metrics per policy (pretrain, SFT, PPO) against the SFT reference and the trained RM."""
  prompts = heldout_prompts(cfg, paths)
  sft_cfg, sft_params, tok = stages.load_policy(dirs["sft"])
  rm_cfg, rm_params, offset = stages.load_reward_model(dirs["reward"])
  reward_fn = lambda ps, rs: stages.score_texts(rm_params, rm_cfg, tok, ps, rs, cfg.reward.data.seq_len) - offset
  out = {"stages": {}}
  for stage in ("pretrain", "sft", "ppo"):
    model, params, _ = stages.load_policy(dirs[stage])
    out["stages"][stage] = evaluate.evaluate_policy(
        params, model, tok, prompts, oracle=tasks.oracle_score, exact=tasks.is_exact,
        prompt_len=cfg.rl.data.prompt_len, max_new_tokens=cfg.ppo.max_new_tokens, ref_params=sft_params,
        reward_fn=reward_fn, seed=cfg.eval.seed, samples_per_prompt=cfg.eval.samples_per_prompt, mesh=mesh)
  return out


COLUMNS = ("oracle_sampled", "oracle_greedy", "exact_sampled", "exact_greedy", "rm_score", "kl_to_sft")


def results_table(results: dict) -> str:
  """The per-stage markdown table of held-out metrics, plus the RM's held-out pairwise accuracy."""
  lines = ["| stage | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
  for stage, m in results["stages"].items():
    lines.append(f"| {stage} | " + " | ".join(f"{m[c]:.3f}" for c in COLUMNS) + " |")
  acc = results.get("reward_heldout_accuracy")
  lines.append(f"\nreward model held-out pairwise accuracy: {acc:.3f}" if acc is not None else "")
  return "\n".join(lines)


def write_report(workdir: str, dirs: dict, results: dict, cfg) -> str:
  """results.json, PNG curves per stage, and report.md linking them; prints the table."""
  plots = {}
  for stage, keys in (("pretrain", ("train_loss", "train_accuracy")), ("sft", ("train_loss", "train_accuracy")),
                      ("reward", ("train_loss", "train_accuracy", "eval_accuracy")),
                      ("ppo", ("score", "kl", "oracle", "ptx_loss", "kl_coef"))):
    rows = metrics.read_jsonl(os.path.join(dirs[stage], "metrics.jsonl"))
    png = metrics.plot_curves(rows, keys, os.path.join(workdir, f"{stage}_curves.png"), title=stage)
    if png:
      plots[stage] = os.path.basename(png)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  table = results_table(results)
  examples = "\n".join(f"- {stage}: " + "; ".join(f"`{p}` → sampled `{s}`, greedy `{g}`" for p, s, g in
                                                 m["examples"][:3]) for stage, m in results["stages"].items())
  report = (f"# InstructGPT pipeline on the embedded task\n\nHeld-out prompts: {cfg.eval.num_prompts} "
            f"({cfg.eval.samples_per_prompt} samples each at temperature 1); wall time {results['minutes']:.1f} min."
            f"\n\n{table}\n\n## Examples\n{examples}\n\n## Curves\n" +
            "\n".join(f"![{s}]({p})" for s, p in plots.items()) + "\n")
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write(report)
  print(table)
  print(f"report: {path}")
  return path
