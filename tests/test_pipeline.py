"""The main job end to end at a seconds-scale size: every stage, the table, plots and report; a re-run resumes;
then `experiments.compare` on the same workdir (its base stages reused): every method, the table, the frontier."""
import json
import math
import os

import numpy as np
import pytest

from experiments.configs import compare as compare_config
from experiments.configs import pipeline as pipeline_config
from rlhf_jax import checkpoint, compare, evaluate, pipeline, stages


def _tiny_config(cfg=None):
  cfg = cfg or pipeline_config.get_config()
  cfg.task.update(dict(num_corpus_docs=300, num_demonstrations=120, num_rl_prompts=40, num_heldout_prompts=16,
                       num_comparison_prompts=30, num_candidates=5))  # K > the RM's default Kmax of 4
  cfg.model.update(dict(d_model=32, num_heads=2, num_kv_heads=2, d_ff=64, num_layers=1))
  cfg.tokenizer.vocab_size = 400
  for stage, steps in (("pretrain", 8), ("sft", 8), ("reward", 8), ("rl", 2)):
    cfg[stage].train.num_steps = steps
    cfg[stage].train.checkpoint_every = steps
    cfg[stage].train.log_every = 2
    cfg[stage].data.batch_size = 8
  cfg.pretrain.data.seq_len = cfg.sft.data.seq_len = 48
  cfg.rl.data.ptx_batch_size = 8
  cfg.rl.data.prompt_len = 24  # a 400-piece tokenizer splits prompts finer than the default's 512
  cfg.comparisons.update(dict(num_prompts=60, num_heldout=8, temperature=1.5))
  cfg.ppo.update(dict(rollout_batch=8, group_size=2, minibatches=2, max_new_tokens=8, sample_every=1))
  cfg.eval.num_prompts = 8
  return cfg


def _snapshot(workdir):
  """Checkpoint step folders and metrics rows of every stage (what a retrain would change)."""
  out = {}
  for stage in ("pretrain", "sft", "reward", "ppo"):
    d = os.path.join(workdir, stage)
    out[stage] = (sorted(os.listdir(os.path.join(d, "checkpoints"))),
                  open(os.path.join(d, "metrics.jsonl")).read())
  out["comparisons"] = os.path.getmtime(os.path.join(workdir, "data", "comparisons_train.jsonl"))
  return out


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  """One tiny pipeline workdir: the pipeline test builds it, the compare test reuses its base stages."""
  return str(tmp_path_factory.mktemp("demo"))


def test_tiny_pipeline_end_to_end_then_resumes(demo_dir, capsys, monkeypatch):
  workdir = demo_dir
  reward_cfgs, run_reward = [], stages.run_reward
  monkeypatch.setattr(stages, "run_reward", lambda cfg, wd: reward_cfgs.append(cfg) or run_reward(cfg, wd))
  results = pipeline.run(_tiny_config(), workdir)
  assert set(results["stages"]) == {"pretrain", "sft", "ppo"}
  for stage, m in results["stages"].items():
    for key in pipeline.COLUMNS:
      assert key in m and isinstance(m[key], float), (stage, key)
    assert 0.0 <= m["oracle_sampled"] <= 1.0 and 0.0 <= m["exact_greedy"] <= 1.0
  assert results["stages"]["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4)
  acc = results["reward_heldout_accuracy"]  # None when no held-out prompt had two differently scored samples
  assert acc is None or 0.0 <= acc <= 1.0
  printed = capsys.readouterr().out
  assert "| stage | oracle_sampled" in printed and "| ppo |" in printed
  report = open(os.path.join(workdir, "report.md")).read()
  for png in ("pretrain_curves.png", "sft_curves.png", "reward_curves.png", "ppo_curves.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000
    assert png in report
  # the RM's own 30 prompts come first, then the demonstrations' (distinct) up to comparisons.num_prompts = 60
  paths = {k: os.path.join(workdir, "data", f"{k}.jsonl") for k in ("comparison_prompts", "demonstrations")}
  own = [json.loads(line)["prompt"] for line in open(paths["comparison_prompts"])]
  demo = list(dict.fromkeys(json.loads(line)["prompt"] for line in open(paths["demonstrations"])))
  ranked = pipeline.comparison_prompts(_tiny_config(), paths, "train")
  assert len(own) == 30 and ranked == list(dict.fromkeys(own + demo))[:60] and ranked[:30] == own
  assert "loglik" in stages.load_reward_model(os.path.join(workdir, "reward"))[1]  # the default RM's feature
  assert [c.data.max_responses for c in reward_cfgs] == [5]  # the RM's Kmax follows task.num_candidates
  ppo_rows = [json.loads(line) for line in open(os.path.join(workdir, "ppo", "metrics.jsonl"))]
  assert len(ppo_rows) == 2 and all("oracle" in r and "kl" in r and "score" in r for r in ppo_rows)

  # sampled metrics are means over eval.samples_per_prompt samples of every prompt
  model, params, tok = stages.load_policy(os.path.join(workdir, "sft"))
  prompts = ["add: 12+30 =", "sort: 3 1 2 ="]
  calls = []
  oracle = lambda p, r: calls.append((p, r)) or float(len(r) % 3)
  m = evaluate.evaluate_policy(params, model, tok, prompts, oracle=oracle, exact=lambda p, r: False, prompt_len=24,
                               max_new_tokens=8, samples_per_prompt=3)
  sampled = calls[:6]
  assert [p for p, _ in sampled] == [prompts[0]] * 3 + [prompts[1]] * 3 and len(calls) == 8  # + 2 greedy
  assert m["oracle_sampled"] == pytest.approx(np.mean([len(r) % 3 for _, r in sampled]))
  with pytest.raises(ValueError, match="samples_per_prompt=0"):
    evaluate.evaluate_policy(params, model, tok, prompts, oracle=oracle, exact=oracle, prompt_len=24,
                             max_new_tokens=8, samples_per_prompt=0)

  before = _snapshot(workdir)
  again = pipeline.run(_tiny_config(), workdir)
  assert _snapshot(workdir) == before  # nothing retrained, no comparisons re-sampled
  assert again["stages"]["ppo"]["oracle_greedy"] == results["stages"]["ppo"]["oracle_greedy"]


def _tiny_compare_config():
  cfg = _tiny_config(compare_config.get_config())
  cfg.compare.update(dict(run="ppo_gae,rloo,grpo,dapo,dpo,ipo,best_of_n", budget=16, points=2, best_of_n=(1, 2, 4), eval_samples=2))
  return cfg


def test_tiny_compare_reuses_the_pipeline_workdir_then_resumes(demo_dir, capsys):
  workdir = demo_dir  # pretrain, SFT, comparisons and RM of the pipeline test (built here when run alone)
  base = {s: checkpoint.saved_steps(os.path.join(workdir, s)) for s in ("pretrain", "sft", "reward")}
  results = compare.run(_tiny_compare_config(), workdir)
  names = ["ppo_gae", "rloo", "grpo", "dapo", "dpo", "ipo", "best_of_n"]
  assert set(results) == {"sft", *names}
  sft = results["sft"]["final"]
  assert sft["kl_to_sft"] == pytest.approx(0.0, abs=1e-4) and sft["corpus_loss"] > 0
  for name in names[:4]:  # 16 responses / 8 per iteration = 2 iterations, a checkpoint at each
    assert checkpoint.saved_steps(os.path.join(workdir, "compare", name)) == [1, 2]
    assert [p["step"] for p in results[name]["frontier"]] == [1, 2]
    final = results[name]["final"]
    for key in compare.COLUMNS[:-1]:
      assert isinstance(final[key], float), (name, key)
    assert results[name]["frontier"][0]["oracle_greedy"] is None  # only the last point is evaluated greedy
  if all(base.values()):
    assert {s: checkpoint.saved_steps(os.path.join(workdir, s)) for s in base} == base  # not retrained
  critic = checkpoint.load_params(os.path.join(workdir, "compare", "ppo_gae"))[0]["value"]
  assert critic is not None and "head" in critic  # the GAE run trains a critic ...
  for name in names[1:4]:  # ... the critic-free methods none
    assert checkpoint.load_params(os.path.join(workdir, "compare", name))[0]["value"] is None
  rows = [json.loads(line) for line in open(os.path.join(workdir, "compare", "dapo", "metrics.jsonl"))]
  assert len(rows) == 2 and all("oracle" in r and "dropped_groups" in r and "clipfrac_high" in r for r in rows)
  with pytest.raises(ValueError, match=r"no checkpoint at step 7 \(saved: \[1, 2\]\)"):
    checkpoint.load_params(os.path.join(workdir, "compare", "rloo"), step=7)
  for name in ("dpo", "ipo"):  # the RM's 8 steps, a checkpoint every 8 // points = 4
    assert [p["step"] for p in results[name]["frontier"]] == [4, 8]
    assert checkpoint.load_extra(os.path.join(workdir, "compare", name))["meta"]["stage"] == "dpo"
  bon = results["best_of_n"]["frontier"]
  assert [p["n"] for p in bon] == [1, 2, 4]
  assert [p["kl_to_sft"] for p in bon] == pytest.approx([math.log(n) - (n - 1) / n for n in (1, 2, 4)])
  printed = capsys.readouterr().out
  for row in ("| sft |", "| ppo_gae |", "| rloo |", "| grpo |", "| dapo |", "| dpo |", "| ipo |",
              "| best_of_n (n=4) |"):
    assert row in printed
  assert os.path.getsize(os.path.join(workdir, "compare", "frontier.png")) > 1000

  before = open(os.path.join(workdir, "compare", "results.json")).read()
  again = compare.run(_tiny_compare_config(), workdir)  # everything finished: nothing retrained or re-evaluated
  assert open(os.path.join(workdir, "compare", "results.json")).read() == before
  assert again["rloo"]["final"] == results["rloo"]["final"]
  changed = _tiny_compare_config()
  changed.methods.rloo.ppo.kl_coef = 0.5
  with pytest.raises(ValueError, match="rloo run with other settings"):
    compare.run(changed, workdir)
  unknown = _tiny_compare_config()
  unknown.compare.run = "rloo,nope"
  with pytest.raises(ValueError, match="compare.run names 'nope'"):
    compare.run(unknown, workdir)


def test_best_of_first_n_picks_the_top_scored_of_the_first_n():
  score_PxRxN = np.array([[[0.1, 0.9, 0.5, 2.0]], [[3.0, 1.0, 3.0, 0.0]]])
  value_PxRxN = np.array([[[10., 11., 12., 13.]], [[20., 21., 22., 23.]]])
  assert compare.best_of_first_n(score_PxRxN, value_PxRxN, 1)[:, 0].tolist() == [10., 20.]
  assert compare.best_of_first_n(score_PxRxN, value_PxRxN, 3)[:, 0].tolist() == [11., 20.]  # tie: the first
  assert compare.best_of_first_n(score_PxRxN, value_PxRxN, 4)[:, 0].tolist() == [13., 20.]
