"""Side by side on one pipeline workdir: PPO with a critic, RLOO, GRPO, DAPO, DPO, IPO and best-of-n with the RM.

Every method starts from the pipeline's SFT policy (`pipeline.base_stages` builds pretrain, SFT, comparisons and
RM if missing). The RL methods train against the RM for the same number of sampled responses, `compare.budget` =
iterations x ppo.rollout_batch, each with its `methods.<name>.ppo` overrides through the one PPO loop (`ppo.run`).
DPO and IPO train on the RM's own comparisons (the ranked SFT samples: no new samples). Best-of-n samples n
responses per held-out prompt from SFT and keeps the RM's favourite; its KL to SFT is the analytic
log n − (n − 1)/n (Stiennon et al. 2020). `compare.points` checkpoints per trained method are evaluated on the
held-out prompts: oracle score against KL to SFT over training (the reward/KL frontier of Gao et al. 2022).
"""
from __future__ import annotations

import json
import math
import os
import time

import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import checkpoint, evaluate, metrics, pipeline, ppo, stages, tasks
from rlhf_jax.model import TransformerConfig

KINDS = ("rl", "dpo", "best_of_n")


def _method(kind: str, **groups) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"kind": kind, **groups})


def config() -> ml_collections.ConfigDict:
  """The pipeline's config plus `compare` (what to run, the budget) and `methods` (each method's overrides)."""
  cfg = pipeline.config()
  cfg.compare = ml_collections.ConfigDict(dict(
      run="ppo_gae,rloo,grpo,dapo,dpo,ipo,best_of_n",  # methods to run (names of cfg.methods), in table order
      budget=25600,  # sampled responses per RL method: iterations = budget / ppo.rollout_batch (100)
      points=4,  # evaluated checkpoints per trained method (frontier), the last one is the table's
      best_of_n=(1, 2, 4, 8, 16),  # n of the best-of-n frontier; the largest is the table's row
      eval_samples=4))  # temperature-1 samples per held-out prompt at every frontier point
  cfg.methods = ml_collections.ConfigDict()
  cfg.methods.ppo_gae = _method("rl", ppo={"group_size": 1})  # InstructGPT: critic from the RM, GAE
  cfg.methods.rloo = _method("rl", ppo={})  # the pipeline's default (ppo.group_size=4): leave-one-out baseline
  cfg.methods.grpo = _method("rl", ppo=dict(  # DeepSeekMath: group-normalised advantage, β·k3 in the loss
      advantage="grpo", loss_agg="grpo", kl_in="loss", kl_coef=0.04, adaptive_kl=False))
  cfg.methods.dapo = _method("rl", ppo=dict(  # DAPO: token-mean loss, clip-higher, no KL, dynamic sampling
      advantage="grpo", loss_agg="dapo", clip_low=0.2, clip_high=0.28, kl_coef=0.0, adaptive_kl=False,
      drop_equal_groups=True))
  cfg.methods.dpo = _method("dpo", dpo={"loss_type": "sigmoid"})  # on the RM's comparisons, the RM's steps
  cfg.methods.ipo = _method("dpo", dpo={"loss_type": "ipo"})
  cfg.methods.best_of_n = _method("best_of_n")
  return cfg


def _rl_config(cfg, name: str, dirs: dict, paths: dict) -> ml_collections.ConfigDict:
  """The PPO stage config of the pipeline with method `name`'s overrides, its budget and frontier checkpoints."""
  iterations = cfg.compare.budget // cfg.ppo.rollout_batch
  if iterations < cfg.compare.points or cfg.compare.budget % cfg.ppo.rollout_batch:
    raise ValueError(f"config compare.budget={cfg.compare.budget} must be a multiple of ppo.rollout_batch="
                     f"{cfg.ppo.rollout_batch} with at least compare.points={cfg.compare.points} iterations")
  rl_cfg = pipeline.ppo_stage_config(cfg, dirs, paths)
  if cfg.methods[name].get("ppo"):
    rl_cfg.ppo.update(cfg.methods[name].ppo.to_dict())
  rl_cfg.train.update(num_steps=iterations, checkpoint_every=max(1, iterations // cfg.compare.points),
                      keep_checkpoints=cfg.compare.points + 1)
  return rl_cfg


def _train(cfg, name: str, dirs: dict, paths: dict, out: str) -> None:
  """Trains method `name` into `out` (resumes; a finished run is skipped by its own loop)."""
  method = cfg.methods[name]
  if method.kind == "rl":
    ppo.run(_rl_config(cfg, name, dirs, paths), out, extra_metrics=pipeline.oracle_metrics,
            reward_fn=pipeline.oracle_reward if cfg.rl_reward == "oracle" else None)
  elif method.kind == "dpo":
    from rlhf_jax import dpo  # the DPO stage (losses.dpo_loss on the shared trainer)
    dpo.run_dpo(_dpo_config(cfg, name, dirs, paths), out)


def _dpo_config(cfg, name: str, dirs: dict, paths: dict) -> ml_collections.ConfigDict:
  """The DPO stage on the RM's comparisons, as many steps and records per step as the RM had, from SFT."""
  from rlhf_jax import dpo
  d = dpo.config()
  d.data.update(train=paths["comparisons_train"], eval=paths.get("comparisons_heldout", ""),
                seq_len=cfg.reward.data.seq_len, batch_size=cfg.reward.data.batch_size,
                max_responses=cfg.reward.data.max_responses or cfg.task.num_candidates)
  d.train.update(num_steps=cfg.reward.train.num_steps, init_from=dirs["sft"], log_every=25, eval_every=0,
                 checkpoint_every=max(1, cfg.reward.train.num_steps // cfg.compare.points),
                 keep_checkpoints=cfg.compare.points + 1)
  d.dpo.update(cfg.methods[name].dpo.to_dict())
  return d


def _policy_at(workdir: str, step: int):
  """The policy parameters saved at `step` in a PPO or DPO workdir."""
  params, _ = checkpoint.load_params(workdir, step=step)
  return params["policy"] if isinstance(params, dict) and "policy" in params else params


class _Judge:
  """Held-out evaluation of policies against one SFT reference (oracle, exact, KL, corpus loss)."""

  def __init__(self, cfg, dirs: dict, paths: dict):
    self.cfg, self.paths = cfg, paths
    self.model, self.sft_params, self.tok = stages.load_policy(dirs["sft"])
    self.prompts = pipeline.heldout_prompts(cfg, paths)
    self.rm_cfg, self.rm_params, self.offset = stages.load_reward_model(dirs["reward"])

  def __call__(self, params, full: bool) -> dict:
    """Held-out metrics of `params` (`full`: greedy and the corpus loss too, else only sampled and KL)."""
    m = evaluate.evaluate_policy(
        params, self.model, self.tok, self.prompts, oracle=tasks.oracle_score, exact=tasks.is_exact,
        prompt_len=self.cfg.rl.data.prompt_len, max_new_tokens=self.cfg.ppo.max_new_tokens, ref_params=self.sft_params,
        seed=self.cfg.eval.seed, samples_per_prompt=self.cfg.compare.eval_samples, greedy=full)
    m.pop("examples")
    if full:
      m["corpus_loss"] = evaluate.corpus_loss(params, self.model, self.tok, self.paths["corpus"])
    return m

  def rm_scores(self, prompts: list[str], responses: list[str]) -> np.ndarray:
    return stages.score_texts(self.rm_params, self.rm_cfg, self.tok, prompts, responses,
                              self.cfg.reward.data.seq_len) - self.offset


def best_of_n(judge: _Judge, ns, repeats: int, seed: int) -> list[dict]:
  """Per n: oracle/exact of the RM's favourite of n SFT samples (mean over `repeats` draws of every prompt) and
  KL(best-of-n ‖ SFT) = log n − (n − 1)/n. The n-sample sets are nested (the first n of the largest draw)."""
  cfg, N = judge.cfg, max(ns)
  repeated = [p for p in judge.prompts for _ in range(repeats * N)]
  texts, _ = evaluate.generate(judge.sft_params, judge.model, judge.tok, repeated, prompt_len=cfg.rl.data.prompt_len,
                               max_new_tokens=cfg.ppo.max_new_tokens, greedy=False, seed=seed)
  P = len(judge.prompts)
  rm_PxRxN = judge.rm_scores(repeated, texts).reshape(P, repeats, N)
  oracle_PxRxN = np.array([tasks.oracle_score(p, r) for p, r in zip(repeated, texts)]).reshape(P, repeats, N)
  exact_PxRxN = np.array([tasks.is_exact(p, r) for p, r in zip(repeated, texts)], float).reshape(P, repeats, N)
  out = []
  for n in ns:
    oracle_P, exact_P = (best_of_first_n(rm_PxRxN, v, n).mean(1) for v in (oracle_PxRxN, exact_PxRxN))
    out.append({"n": n, "oracle_sampled": float(oracle_P.mean()),
                "oracle_sampled_se": evaluate.standard_error(oracle_P), "exact_sampled": float(exact_P.mean()),
                "kl_to_sft": math.log(n) - (n - 1) / n})
  return out


def best_of_first_n(score_PxRxN: np.ndarray, value_PxRxN: np.ndarray, n: int) -> np.ndarray:
  """value_PxR of the highest-scoring of the first n samples of each (prompt, repeat); ties go to the first."""
  pick_PxRx1 = np.argmax(score_PxRxN[..., :n], axis=-1)[..., None]
  return np.take_along_axis(value_PxRxN, pick_PxRx1, -1)[..., 0]


def _settings(cfg, name: str) -> dict:
  """What a method's results depend on (a stored result with other settings is not reused)."""
  return {"method": cfg.methods[name].to_dict(), "budget": cfg.compare.budget, "points": cfg.compare.points,
          "best_of_n": list(cfg.compare.best_of_n), "eval_samples": cfg.compare.eval_samples}


def _frontier(judge: _Judge, out: str) -> list[dict]:
  """Held-out metrics at every checkpoint of a trained method (the last one with greedy and corpus loss)."""
  steps = checkpoint.saved_steps(out)
  return [dict(judge(_policy_at(out, s), full=s == steps[-1]), step=s) for s in steps]


def run_method(cfg, name: str, judge: _Judge, dirs: dict, paths: dict, root: str) -> dict:
  """Trains (or resumes) and evaluates one method: {"wall_s", "frontier": [...], "final": {...}, "settings"}.

  wall_s is this process's training time (best-of-n: sampling and scoring n x eval_samples per held-out prompt)."""
  kind = cfg.methods[name].kind
  t0 = time.perf_counter()
  if kind == "best_of_n":
    frontier = best_of_n(judge, sorted(cfg.compare.best_of_n), cfg.compare.eval_samples, cfg.eval.seed + 1)
    wall = time.perf_counter() - t0
    final = dict(frontier[-1], corpus_loss=judge.sft["corpus_loss"])
  else:
    out = os.path.join(root, name)
    _train(cfg, name, dirs, paths, out)
    wall = time.perf_counter() - t0
    frontier = _frontier(judge, out)
    final = frontier[-1]
  logging.info("compare %s: oracle %.3f (se %.3f), KL %.2f, %.0f s", name, final["oracle_sampled"],
               final["oracle_sampled_se"], final["kl_to_sft"], wall)
  return {"wall_s": wall, "frontier": frontier, "final": final, "settings": _settings(cfg, name)}


def _names(cfg) -> list[str]:
  names = [n.strip() for n in cfg.compare.run.split(",") if n.strip()]
  for n in names:
    if n not in cfg.methods:
      raise ValueError(f"config compare.run names {n!r}, not one of cfg.methods: {sorted(cfg.methods)}")
    if cfg.methods[n].kind not in KINDS:
      raise ValueError(f"config methods.{n}.kind={cfg.methods[n].kind!r}; expected one of {KINDS}")
  if not names:
    raise ValueError("config compare.run is empty: name at least one method of cfg.methods")
  return names


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Base stages if missing, then every method of `compare.run`: trained, evaluated, one table and the frontier PNG.

  Results are kept in `workdir/compare/results.json`; a re-run re-uses each method's finished result.
  """
  names = _names(cfg)
  dirs, paths = pipeline.base_stages(cfg, workdir)
  root = os.path.join(workdir, "compare")
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "results.json")
  results = json.load(open(path)) if os.path.exists(path) else {}
  judge = _Judge(cfg, dirs, paths)
  if "sft" not in results:
    results["sft"] = {"wall_s": 0.0, "final": dict(judge(judge.sft_params, full=True), step=0)}
  judge.sft = results["sft"]["final"]
  for name in names:
    if name in results and results[name]["settings"] != _settings(cfg, name):
      raise ValueError(f"{path} holds {name} run with other settings ({results[name]['settings']}); delete "
                       f"{os.path.join(root, name)} and its entry, or give a fresh --workdir")
    if name not in results:
      results[name] = run_method(cfg, name, judge, dirs, paths, root)
      with open(path, "w") as f:
        json.dump(results, f, indent=1)
  curves = {n: [(0.0, judge.sft["oracle_sampled"])] * (cfg.methods[n].kind != "best_of_n") +
            [(p["kl_to_sft"], p["oracle_sampled"]) for p in results[n]["frontier"]] for n in names}
  png = metrics.plot_frontier(curves, os.path.join(root, "frontier.png"),
                              title="held-out oracle score vs KL to SFT")
  table = results_table(results, ["sft"] + names)
  print(table)
  print(f"frontier: {png}")
  return results


COLUMNS = ("oracle_sampled", "oracle_sampled_se", "oracle_greedy", "exact_sampled", "exact_greedy", "kl_to_sft",
           "corpus_loss", "wall_s")


def results_table(results: dict, names: list[str]) -> str:
  """One markdown row per method: its final policy's held-out metrics and its training wall time ("-": n/a)."""
  lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
  for n in names:
    row = dict(results[n]["final"], wall_s=results[n]["wall_s"])
    label = f"{n} (n={row['n']})" if "n" in row else n
    lines.append(f"| {label} | " + " | ".join("-" if row.get(c) is None else f"{row[c]:.3f}" for c in COLUMNS) +
                 " |")
  return "\n".join(lines)
