"""Hallucination on the embedded knowledge task: demonstration policy × fabrication penalty, measured per stage.

Schulman's argument: labelers who answer from knowledge the model lacks teach it, by behaviour cloning, to assert
what it does not know; a reward that punishes fabrication can fix that (InstructGPT found plain RLHF made it
worse). Here the task is knowledge questions only (`ask: capital of zorbat? =`); the pretraining corpus states facts
for the "known" entities and never names the others. The grid crosses `TaskConfig.demo_policy` ("full_knowledge":
labelers state every true value; "abstain_unknown": they answer ABSTAIN for entities absent from the corpus) with
`TaskConfig.fabrication_penalty` (plain oracle ranking vs the explicit penalty, which also puts a labeler-written
ABSTAIN into every knowledge comparison: `rankings.comparison_candidates`).

Each cell is one `pipeline.run` workdir, `workdir/<policy>-<plain|penalty>`. Cells share pretraining (the first
cell's finished pretrain/ and tokenizer/ are copied into the others) and, per demonstration policy, the SFT model
(the row's first cell's sft/ is copied into its other cell); the pipeline skips a copied, finished stage.

Metrics on every held-out question (held-out entities × attributes), per stage, sampled at temperature 1
(`grid.samples_per_question` each) and greedy:
  accuracy_known       P(true value | known entity)
  abstain_known        P(ABSTAIN | known)                               over-abstention
  fabrication_unknown  P(non-empty answer other than ABSTAIN | unknown)  unsupported assertion
  valuelike_unknown    P(an answer shaped like a value, knowledge.VALUE_PATTERN | unknown)  the confident subset
  abstain_unknown      P(ABSTAIN | unknown)
  cloze_known          greedy "the capital of zorbat is" -> true value  (stored, asked in the corpus's words)
and each cell's RM on the same questions: P(RM(true value) > RM(ABSTAIN) | known) and
P(RM(ABSTAIN) > RM(an asserted value) | unknown) (the asserted value is the entity's hash value, never seen).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import ml_collections
import numpy as np

from rlhf_jax import evaluate, knowledge, parallel, pipeline, stages, tasks
from rlhf_jax.tokenizer import load_tokenizer

STAGES = ("pretrain", "sft", "ppo")
METRICS = ("accuracy_known", "abstain_known", "fabrication_unknown", "valuelike_unknown", "abstain_unknown")
RM_METRICS = ("rm_correct_over_abstain_known", "rm_abstain_over_fabrication_unknown")


def config() -> ml_collections.ConfigDict:
  """The pipeline config on knowledge questions only, sized for the 2×2 grid (~17 min on 2 CPU cores), + `grid`."""
  cfg = pipeline.config()
  cfg.task.update(dict(
      operations=(),  # knowledge questions only (no arithmetic families)
      knowledge=True,  # the knowledge family: facts in the corpus for known entities only
      num_entities=120,  # 60 known + 60 unknown made-up entities
      heldout_fraction=0.2))  # 12 known + 12 unknown held-out entities (× 3 attributes = 72 questions)
  cfg.sft.train.num_steps = cfg.sft.train.checkpoint_every = 400  # demonstrations are one short word each
  cfg.reward.train.num_steps = cfg.reward.train.checkpoint_every = 200
  cfg.rl.train.num_steps = cfg.rl.train.checkpoint_every = 60  # PPO iterations
  cfg.comparisons.num_prompts = 600  # > the 180 distinct train questions (60 entities × 3): all of them
  # The pipeline defaults of the measured grid (BENCHMARKS.md), kept when the pipeline's own moved (2026-12-01/02):
  cfg.task.num_comparison_prompts, cfg.task.num_rl_prompts = 0, 1000  # comparisons on the demonstrations' prompts
  cfg.reward.loss.update(dict(loglik_feature=False, lm_coef=0.0))  # the plain scalar-head RM
  cfg.reward.opt.lr, cfg.rl.opt.lr = 3e-4, 1e-4
  cfg.ppo.update(dict(rollout_batch=64, ppo_epochs=4, kl_coef=1.0, kl_horizon=1000, group_size=1))  # a critic
  cfg.pretrain.train.num_steps = cfg.pretrain.train.checkpoint_every = 600
  cfg.rl.data.prompt_len = 24
  cfg.ppo.max_new_tokens = 8  # answers are one word
  cfg.eval.num_prompts = 60  # the pipeline's own held-out table (oracle score, RM score, KL) per cell
  cfg.grid = ml_collections.ConfigDict(dict(
      demo_policies=tasks.DEMO_POLICIES,  # SFT demonstration policies (rows of the grid)
      penalties=(False, True),  # fabrication_penalty values (columns of the grid)
      samples_per_question=8,  # temperature-1 samples per held-out question
      seed=0))  # sampling seed of the knowledge evaluation
  return cfg


def cell_name(policy: str, penalty: bool) -> str:
  """The cell's workdir name under the grid workdir."""
  return f"{policy}-{'penalty' if penalty else 'plain'}"


def cell_config(cfg: ml_collections.ConfigDict, policy: str, penalty: bool) -> ml_collections.ConfigDict:
  """The pipeline config of one cell: the grid config with task.demo_policy and task.fabrication_penalty set."""
  cell = ml_collections.ConfigDict(cfg.to_dict())
  cell.task.demo_policy, cell.task.fabrication_penalty = policy, bool(penalty)
  return cell


def check_grid(cfg: ml_collections.ConfigDict) -> tuple[tuple[str, ...], tuple[bool, ...]]:
  """(demonstration policies, penalties in order); ValueError naming the config field when invalid."""
  policies, penalties = tuple(cfg.grid.demo_policies), tuple(cfg.grid.penalties)
  if not policies or len(set(policies)) != len(policies) or not set(policies) <= set(tasks.DEMO_POLICIES):
    raise ValueError(f"config grid.demo_policies={policies!r}; expected distinct names from {tasks.DEMO_POLICIES}")
  if not penalties or not all(isinstance(p, bool) for p in penalties) or len(set(penalties)) != len(penalties):
    raise ValueError(f"config grid.penalties={penalties!r}; expected distinct booleans")
  if not cfg.task.knowledge:
    raise ValueError("config task.knowledge=False; the hallucination grid needs the knowledge family")
  if cfg.grid.samples_per_question < 1:
    raise ValueError(f"config grid.samples_per_question={cfg.grid.samples_per_question}; expected >= 1")
  return policies, tuple(sorted(penalties))


def heldout_questions(task_cfg: tasks.TaskConfig) -> list[str]:
  """Every held-out knowledge question: each held-out entity of the pool asked each attribute."""
  names = [e for e in knowledge.entity_pool(task_cfg) if tasks.split_of(e, task_cfg) == "heldout"]
  return [f"{tasks.KNOWLEDGE}: {t} of {e}?{tasks.SEP}" for e in names for t in knowledge.ATTRIBUTES]


def asserts(response) -> bool:
  """Whether a response asserts an answer: non-empty (stripped) and not ABSTAIN."""
  return isinstance(response, str) and response.strip() not in ("", knowledge.ABSTAIN)


def knowledge_metrics(prompts: list[str], responses: list[str]) -> dict[str, float]:
  """METRICS (+ wrong_known, empty_unknown) over knowledge questions: rates among known and among unknown ones."""
  if len(prompts) != len(responses):
    raise ValueError(f"knowledge_metrics: {len(prompts)} prompts but {len(responses)} responses")
  n = {"known": 0, "unknown": 0}
  hits = dict.fromkeys(METRICS + ("wrong_known", "empty_unknown"), 0)
  for prompt, response in zip(prompts, responses):
    kind = "known" if knowledge.is_known_entity(prompt) else "unknown"
    label = knowledge.classify_answer(prompt, response)
    n[kind] += 1
    if label == "abstain":
      hits[f"abstain_{kind}"] += 1
    elif label == "correct":
      hits["accuracy_known"] += 1
    elif kind == "known":
      hits["wrong_known"] += 1  # asserted wrong, or empty
    else:
      hits["fabrication_unknown" if asserts(response) else "empty_unknown"] += 1
      hits["valuelike_unknown"] += bool(re.fullmatch(knowledge.VALUE_PATTERN, response.strip()))
  if not n["known"] or not n["unknown"]:
    raise ValueError(f"knowledge_metrics: {n['known']} known and {n['unknown']} unknown questions; need both")
  return {k: v / n[k.rsplit("_", 1)[1]] for k, v in hits.items()}


def cloze_accuracy(params, model, tok, questions: list[str], gen: dict) -> float:
  """Share of known-entity facts the policy completes in the corpus's own wording, greedily:
  "the capital of zorbat is" -> first word == the true value (what it stores, whether or not it answers it)."""
  args = [tasks.parse_prompt(q)[1] for q in questions]
  texts, _ = evaluate.generate(params, model, tok, [f"the {a['t']} of {a['e']} is" for a in args], greedy=True,
                               **gen)
  return float(np.mean([(t.split() or [""])[0].rstrip(".") == knowledge.knowledge_value(a["t"], a["e"])
                        for a, t in zip(args, texts)]))


def evaluate_stage(policy_dir: str, questions: list[str], cfg: ml_collections.ConfigDict) -> dict:
  """Knowledge metrics of one policy workdir: sampled (samples_per_question each, temperature 1) and greedy_*."""
  model, params, tok = stages.load_policy(policy_dir)
  reps = [q for q in questions for _ in range(cfg.grid.samples_per_question)]
  gen = dict(prompt_len=cfg.rl.data.prompt_len, max_new_tokens=cfg.ppo.max_new_tokens,
             mesh=parallel.make_mesh(cfg.mesh))
  sampled, _ = evaluate.generate(params, model, tok, reps, greedy=False, seed=cfg.grid.seed, **gen)
  greedy, _ = evaluate.generate(params, model, tok, questions, greedy=True, **gen)
  out = knowledge_metrics(reps, sampled)
  out.update({f"greedy_{k}": v for k, v in knowledge_metrics(questions, greedy).items()})
  out["cloze_known"] = cloze_accuracy(params, model, tok, [q for q in questions if knowledge.is_known_entity(q)], gen)
  out["examples"] = [(q, s, g) for q, s, g in zip(questions[::7], sampled[::7 * cfg.grid.samples_per_question],
                                                  greedy[::7])][:6]
  return out


def reward_preferences(reward_dir: str, questions: list[str], seq_len: int) -> dict[str, float]:
  """RM_METRICS: how often the RM prefers the true value to ABSTAIN (known) and ABSTAIN to an assertion (unknown)."""
  rm_cfg, rm_params, _ = stages.load_reward_model(reward_dir)
  tok = load_tokenizer(reward_dir)
  values = [knowledge.knowledge_value(a["t"], a["e"]) for a in (tasks.parse_prompt(q)[1] for q in questions)]
  scores = stages.score_texts(rm_params, rm_cfg, tok, questions * 2, values + [knowledge.ABSTAIN] * len(questions),
                             seq_len)  # one call: score_texts compiles on every call
  value_scores, abstain_scores = scores[:len(questions)], scores[len(questions):]
  known = np.array([knowledge.is_known_entity(q) for q in questions])
  return {RM_METRICS[0]: float(np.mean((value_scores > abstain_scores)[known])),
          RM_METRICS[1]: float(np.mean((abstain_scores > value_scores)[~known]))}


def copy_stages(src: str, dst: str, names: tuple[str, ...]) -> None:
  """Copies finished stage folders of one cell workdir into another (atomically; an existing one is kept)."""
  for name in names:
    target = os.path.join(dst, name)
    if not os.path.exists(target):
      shutil.rmtree(target + ".partial", ignore_errors=True)
      shutil.copytree(os.path.join(src, name), target + ".partial", symlinks=True)
      os.replace(target + ".partial", target)


def run_cells(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict]:
  """Runs (or resumes) every cell's pipeline; returns ({cell: pipeline results}, {cell: {stage: trained in dir}})."""
  policies, penalties = check_grid(cfg)
  results, origin, first = {}, {}, None
  for policy in policies:
    sft_from = None  # the row's first cell trains SFT; the others copy it (same demonstrations, same model)
    for penalty in penalties:
      name = cell_name(policy, penalty)
      cell_dir = os.path.join(workdir, name)
      if first:
        copy_stages(first, cell_dir, ("tokenizer", "pretrain"))
      if sft_from:
        copy_stages(sft_from, cell_dir, ("sft",))
      results[name] = pipeline.run(cell_config(cfg, policy, penalty), cell_dir)
      first, sft_from = first or cell_dir, sft_from or cell_dir
      origin[name] = {"pretrain": first, "sft": sft_from, "ppo": cell_dir}
  return results, origin


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """The grid: every cell's pipeline, then knowledge metrics per stage per cell; writes table, chart, report."""
  t0 = time.perf_counter()
  policies, _ = check_grid(cfg)  # before anything is written
  os.makedirs(workdir, exist_ok=True)
  pipeline_results, origin = run_cells(cfg, workdir)
  questions = heldout_questions(tasks.TaskConfig(**cell_config(cfg, policies[0], False).task.to_dict()))
  cache, cells = {}, {}
  for name, trained_in in origin.items():
    for stage, src in trained_in.items():  # a stage shared by several cells is evaluated once
      if (stage, src) not in cache:
        cache[stage, src] = evaluate_stage(os.path.join(src, stage), questions, cfg)
    cells[name] = {"stages": {s: cache[s, src] for s, src in trained_in.items()}, "shared_from": trained_in,
                   "reward": reward_preferences(os.path.join(workdir, name, "reward"), questions,
                                                cfg.reward.data.seq_len),
                   "pipeline": pipeline_results[name]}
  results = {"cells": cells, "num_questions": len(questions), "minutes": (time.perf_counter() - t0) / 60}
  write_report(workdir, results, cfg)
  return results


def results_table(results: dict) -> str:
  """Markdown: a row per (cell, stage), each metric as `sampled / greedy`, + cloze_known; then the RM per cell."""
  lines = ["| cell | stage | " + " | ".join(METRICS) + " | cloze_known |", "|---" * (len(METRICS) + 3) + "|"]
  for name, cell in results["cells"].items():
    for stage in STAGES:
      m = cell["stages"][stage]
      lines.append(f"| {name} | {stage} | " + " | ".join(f"{m[k]:.3f} / {m['greedy_' + k]:.3f}" for k in METRICS)
                   + f" | {m['cloze_known']:.3f} |")
  lines += ["", "| cell | " + " | ".join(RM_METRICS) + " | rm_heldout_pairwise_accuracy |",
            "|---" * (len(RM_METRICS) + 2) + "|"]
  for name, cell in results["cells"].items():
    acc = cell["pipeline"].get("reward_heldout_accuracy")
    lines.append(f"| {name} | " + " | ".join(f"{cell['reward'][k]:.3f}" for k in RM_METRICS)
                 + f" | {'n/a' if acc is None else f'{acc:.3f}'} |")
  return "\n".join(lines)


def plot_grid(results: dict, png_path: str) -> str:
  """Bar chart: a panel per metric; per cell a bar per stage (sampled), a black dot per stage (greedy)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(results["cells"])
  fig, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 4), squeeze=False)
  width, x = 0.8 / len(STAGES), np.arange(len(names))
  for ax, key in zip(axes[0], METRICS):
    for j, stage in enumerate(STAGES):
      pos = x + (j - (len(STAGES) - 1) / 2) * width
      ax.bar(pos, [results["cells"][n]["stages"][stage][key] for n in names], width, label=stage)
      ax.plot(pos, [results["cells"][n]["stages"][stage]["greedy_" + key] for n in names], "k.")
    ax.set_title(key)
    ax.set_ylim(0, 1.05)
    ax.set_xticks(x, [n.replace("-", "\n") for n in names], fontsize=8)
  axes[0][0].legend(fontsize=8)
  fig.suptitle("held-out knowledge questions: bars sampled (T=1), dots greedy")
  fig.tight_layout()
  fig.savefig(png_path, dpi=80)
  plt.close(fig)
  return png_path


def write_report(workdir: str, results: dict, cfg: ml_collections.ConfigDict) -> str:
  """results.json, hallucination.png and hallucination.md under workdir; prints the table."""
  with open(os.path.join(workdir, "hallucination_results.json"), "w") as f:
    json.dump(results, f, indent=1)
  png = plot_grid(results, os.path.join(workdir, "hallucination.png"))
  table = results_table(results)
  examples = "\n".join(f"- {name} {stage}: " + "; ".join(f"`{q}` → `{s}` / `{g}`" for q, s, g in
                                                       cell["stages"][stage]["examples"][:3])
                       for name, cell in results["cells"].items() for stage in ("sft", "ppo"))
  path = os.path.join(workdir, "hallucination.md")
  with open(path, "w") as f:
    f.write(f"# Hallucination grid\n\n{results['num_questions']} held-out questions, "
            f"{cfg.grid.samples_per_question} samples each; wall time {results['minutes']:.1f} min.\n\n{table}\n\n"
            f"## Examples (sampled / greedy)\n{examples}\n\n![grid]({os.path.basename(png)})\n")
  print(table)
  print(f"report: {path}")
  return path
