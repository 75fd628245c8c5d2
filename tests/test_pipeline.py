"""The main job end to end at a seconds-scale size: every stage, the table, plots and report; a re-run resumes."""
import json
import os

import numpy as np
import pytest

from experiments.configs import pipeline as pipeline_config
from rlhf_jax import evaluate, pipeline, stages


def _tiny_config():
  cfg = pipeline_config.get_config()
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


def test_tiny_pipeline_end_to_end_then_resumes(tmp_path, capsys, monkeypatch):
  workdir = str(tmp_path / "demo")
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
