"""Hallucination grid: knowledge metrics on hand cases, held-out questions, grid config errors, and a tiny 2×2 grid
end to end (shared pretraining and SFT, penalty comparisons with ABSTAIN, table, chart)."""
import json
import os

import pytest

from experiments.configs import hallucination as hallucination_config
from rlhf_jax import hallucination as H
from rlhf_jax import knowledge as K
from rlhf_jax import tasks as T


def _known_unknown(cfg):
  pool = K.entity_pool(cfg)
  known = [e for e in pool if K.is_known_entity(f"ask: color of {e}? =")]
  return known, [e for e in pool if e not in known]


def test_knowledge_metrics_hand_cases():
  (k1, k2, *_), (u1, u2, *_) = _known_unknown(T.TaskConfig(knowledge=True))
  true_k1, true_u1 = K.knowledge_value("capital", k1), K.knowledge_value("capital", u1)
  prompts = [f"ask: capital of {k1}? =", f"ask: ruler of {k2}? =", f"ask: capital of {k1}? =",
             f"ask: capital of {k1}? =",
             f"ask: capital of {u1}? =", f"ask: capital of {u1}? =", f"ask: color of {u2}? =",
             f"ask: capital of {u1}? =", f"ask: color of {u2}? ="]
  responses = [true_k1, " unknown ", "zzzzz", "",  # known: correct, abstain, wrong, empty (wrong)
               "unknown", true_u1, "vexmo", "  ", "unknown."]  # unknown: abstain, 3 fabrications, empty
  m = H.knowledge_metrics(prompts, responses)
  # By hand: 4 known (1 correct, 1 abstain, 2 wrong); 5 unknown (1 abstain, 3 asserted, 1 empty); of the 3
  # assertions only the hash value is shaped like a value ("vexmo": x is no value consonant; "unknown." too long).
  want = {"accuracy_known": 1 / 4, "abstain_known": 1 / 4, "wrong_known": 2 / 4,
          "fabrication_unknown": 3 / 5, "valuelike_unknown": 1 / 5, "abstain_unknown": 1 / 5, "empty_unknown": 1 / 5}
  assert m == pytest.approx(want)
  assert [H.asserts(r) for r in ("unknown", " unknown\n", "", " ", "vexmo", "unknown.", None)] == [
      False, False, False, False, True, True, False]
  with pytest.raises(ValueError, match="need both"):
    H.knowledge_metrics(prompts[:4], responses[:4])
  with pytest.raises(ValueError, match="2 prompts but 1 responses"):
    H.knowledge_metrics(prompts[:2], responses[:1])
  with pytest.raises(ValueError, match="not a knowledge question"):
    H.knowledge_metrics(["add: 1+2 ="], ["3"])


def test_heldout_questions_cover_heldout_entities_and_attributes():
  cfg = T.TaskConfig(knowledge=True, operations=(), num_entities=40, heldout_fraction=0.2)
  questions = H.heldout_questions(cfg)
  heldout = [e for e in K.entity_pool(cfg) if T.split_of(e, cfg) == "heldout"]
  assert len(questions) == len(set(questions)) == 3 * len(heldout)
  assert sum(map(K.is_known_entity, questions)) == len(questions) / 2 == 3 * 4  # round(20 * 0.2) per side
  held_prompts = set(T.split_prompts(cfg, "heldout"))
  assert held_prompts <= set(questions)  # the sampled held-out prompts are among them


def test_grid_config_errors():
  cfg = hallucination_config.get_config()
  assert H.check_grid(cfg) == (T.DEMO_POLICIES, (False, True))
  cfg.grid.penalties = (True, False)
  assert H.check_grid(cfg) == (T.DEMO_POLICIES, (False, True))
  cfg.grid.penalties = (True,)
  assert H.check_grid(cfg) == (T.DEMO_POLICIES, (True,))
  for field, value, match in (("demo_policies", ("oracle",), "grid.demo_policies"),
                              ("demo_policies", (), "grid.demo_policies"),
                              ("penalties", (1,), "distinct booleans"), ("penalties", (True, True), "distinct"),
                              ("samples_per_question", 0, "samples_per_question")):
    bad = hallucination_config.get_config()
    bad.grid[field] = value
    with pytest.raises(ValueError, match=match):
      H.check_grid(bad)
  bad = hallucination_config.get_config()
  bad.task.knowledge = False
  with pytest.raises(ValueError, match="task.knowledge"):
    H.check_grid(bad)
  cell = H.cell_config(cfg, "abstain_unknown", True)
  task = T.TaskConfig(**cell.task.to_dict())
  assert task.operations == () and task.knowledge and task.demo_policy == "abstain_unknown"
  assert task.fabrication_penalty and not cfg.task.get("fabrication_penalty", False)


def _tiny_config():
  cfg = hallucination_config.get_config()
  cfg.task.update(dict(num_corpus_docs=300, num_demonstrations=120, num_rl_prompts=40, num_heldout_prompts=16,
                       num_entities=8, comparison_noise_rate=0.0, demo_error_rate=0.0))
  cfg.model.update(dict(d_model=32, num_heads=2, num_kv_heads=2, d_ff=64, num_layers=1))
  cfg.tokenizer.vocab_size = 400
  for stage, steps in (("pretrain", 6), ("sft", 6), ("reward", 4), ("rl", 1)):
    cfg[stage].train.num_steps = cfg[stage].train.checkpoint_every = steps
    cfg[stage].train.log_every = 2
    cfg[stage].data.batch_size = 8
  cfg.pretrain.data.seq_len = cfg.sft.data.seq_len = 48
  # Enough SFT to memorise the 12 demonstration prompts: the pipeline raises when no prompt's samples differ in
  # score, which an untrained policy (never sampling ABSTAIN or a true value) would make certain.
  cfg.sft.train.num_steps = cfg.sft.train.checkpoint_every = 120
  cfg.sft.opt.lr = 1e-2
  cfg.rl.data.ptx_batch_size = 8
  cfg.comparisons.update(dict(num_prompts=30, num_heldout=8, temperature=1.5))  # diverse samples: some differ
  cfg.ppo.update(dict(rollout_batch=8, minibatches=2, max_new_tokens=6, sample_every=0))
  cfg.eval.num_prompts = 8
  cfg.grid.samples_per_question = 2
  return cfg


def _records(workdir, name):
  return [json.loads(line) for line in open(os.path.join(workdir, name, "data", "comparisons_train.jsonl"))]


def test_tiny_grid_end_to_end(tmp_path, capsys):
  """One row of the grid (a 2x2 takes twice as long): plain and penalty cells of the abstaining labelers."""
  cfg = _tiny_config()
  cfg.grid.demo_policies = ("abstain_unknown",)
  workdir = str(tmp_path / "grid")
  results = H.run(cfg, workdir)
  plain, penalty = names = [H.cell_name("abstain_unknown", q) for q in (False, True)]
  assert list(results["cells"]) == names and results["num_questions"] == 6  # 2 held-out entities × 3
  for cell in results["cells"].values():
    for stage in H.STAGES:
      m = cell["stages"][stage]
      assert 0.0 <= m["cloze_known"] <= 1.0 and m["valuelike_unknown"] <= m["fabrication_unknown"]
      for prefix in ("", "greedy_"):
        assert m[prefix + "accuracy_known"] + m[prefix + "abstain_known"] + m[prefix + "wrong_known"] == (
            pytest.approx(1.0))
        assert m[prefix + "fabrication_unknown"] + m[prefix + "abstain_unknown"] + m[prefix + "empty_unknown"] == (
            pytest.approx(1.0))
    assert all(0.0 <= cell["reward"][k] <= 1.0 for k in H.RM_METRICS)
  # The penalty cell reuses the plain cell's pretraining and SFT (copied, not retrained); PPO is its own.
  first = os.path.join(workdir, plain)
  assert results["cells"][penalty]["shared_from"] == {"pretrain": first, "sft": first,
                                                      "ppo": os.path.join(workdir, penalty)}
  for stage in ("pretrain", "sft"):
    assert open(os.path.join(workdir, penalty, stage, "metrics.jsonl")).read() == open(
        os.path.join(first, stage, "metrics.jsonl")).read()
  assert results["cells"][penalty]["stages"]["sft"] is results["cells"][plain]["stages"]["sft"]
  # Noise-free rankings: correct > ABSTAIN > anything asserted (known), ABSTAIN first (unknown), in both cells.
  for name in names:
    for r in _records(workdir, name):
      labels = [K.classify_answer(r["prompt"], r["responses"][i]) for i in r["ranking"]]
      assert labels == sorted(labels, key=["correct", "abstain", "wrong"].index), r
  # The penalty cell's comparisons come from the same (copied) SFT model's samples as the plain cell's, plus the
  # labeler-written ABSTAIN in every record (so prompts whose samples all asserted become comparisons too).
  plain_records = {r["prompt"]: r["responses"] for r in _records(workdir, plain)}
  penalty_records = {r["prompt"]: r["responses"] for r in _records(workdir, penalty)}
  assert plain_records and all(K.ABSTAIN in rs for rs in penalty_records.values())
  assert all(set(rs) <= set(penalty_records[p]) for p, rs in plain_records.items())
  assert len(penalty_records) > len(plain_records)
  printed = capsys.readouterr().out
  assert "| cell | stage | accuracy_known" in printed and f"| {penalty} | ppo |" in printed
  report = open(os.path.join(workdir, "hallucination.md")).read()
  assert "hallucination.png" in report and os.path.getsize(os.path.join(workdir, "hallucination.png")) > 1000
  assert json.load(open(os.path.join(workdir, "hallucination_results.json")))["num_questions"] == 6
