"""Embedded task: oracle hand cases, determinism, disjoint splits, labeler and corpus error rates, files as JSON
lines (comparisons checked), the family registry, config errors. The knowledge family's own tests are in
test_knowledge.py; ranking and the fabrication penalty in test_rankings.py."""
import dataclasses
import json
import math
import re

import numpy as np
import pytest

from rlhf_jax import tasks as T

SMALL = dict(num_corpus_docs=300, num_demonstrations=300, num_rl_prompts=200, num_heldout_prompts=100,
             num_comparison_prompts=150)


def _within(observed: float, p: float, n: int, sigmas: float = 4.0) -> bool:
  return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------------------------------------ oracle

ORACLE_CASES = [
    # (prompt, response, expected score): partial credits computed by hand in the comments.
    ("reverse: k3x9a =", "a9x3k", 1.0),
    ("reverse: k3x9a =", "  a9x3k \n", 1.0),  # outer whitespace ignored
    ("reverse: k3x9a =", "a9x3q", 4 / 5),  # 4 of 5 positions agree
    ("reverse: k3x9a =", "a9x3", 4 / 5),  # 4 agree, longer length 5
    ("reverse: k3x9a =", "a9x3kk", 5 / 6),  # 5 agree, longer length 6
    ("reverse: k3x9a =", "k3x9a", 1 / 5),  # unreversed: only the middle "x" agrees
    ("sort: 7 2 9 4 =", "2 4 7 9", 1.0),
    ("sort: 7 2 9 4 =", "2  4\t7 9", 1.0),  # inner whitespace collapses
    ("sort: 7 2 9 4 =", "2 4 9 7", 2 / 4),
    ("sort: 7 2 9 4 =", "2 4 7", 3 / 4),
    ("sort: 5 5 1 =", "1 5 5", 1.0),
    ("add: 48+17 =", "65", 1.0),
    ("add: 48+17 =", "64", 1 / 2),  # right-aligned digits: 6 agrees, 4 != 5
    ("add: 48+17 =", "165", 2 / 3),  # 6 and 5 agree over length 3
    ("add: 48+17 =", "56", 0.0),
    ("add: 48+17 =", "6 5", 0.0),  # not a number
    ("add: 48+17 =", "-65", 0.0),
    ("count a: abacab =", "3", 1.0),
    ("count a: abacab =", "2", 0.5),
    ("count a: abacab =", "4", 0.5),
    ("count a: abacab =", "5", 0.0),
    ("count a: abacab =", "three", 0.0),
    ("count e: abacab =", "0", 1.0),
]


@pytest.mark.parametrize("prompt,response,expected", ORACLE_CASES)
def test_oracle_hand_cases(prompt, response, expected):
  assert T.oracle_score(prompt, response) == pytest.approx(expected)
  assert T.is_exact(prompt, response) == (expected == 1.0)


@pytest.mark.parametrize("prompt", ["reverse: k3x9a =", "sort: 7 2 9 4 =", "add: 48+17 =", "count a: abacab =",
                                    "ask: capital of zorbat? ="])
@pytest.mark.parametrize("response", ["", "   \n\t", "#$%!? garbage", "\x00\ufffd\u0663", "x" * 100_000,
                                      "9" * 10_000, None, 65, ["2", "4"]])
def test_oracle_never_raises_and_garbage_scores_zero(prompt, response):
  assert T.oracle_score(prompt, response) == 0.0


def test_reference_answers_and_prompt_parsing():
  assert T.reference_answer("reverse: k3x9a =") == "a9x3k"
  assert T.reference_answer("sort: 7 2 9 4 =\n") == "2 4 7 9"  # trailing whitespace tolerated
  assert T.reference_answer("add: 48+17") == "65"  # separator optional
  assert T.reference_answer("count b: abacab =") == "2"
  for bad in ["", "hello: 1 =", "add: 48-17 =", "sort: 7 x 9 =", "reverse: K3X =", "count ab: abc ="]:
    with pytest.raises(ValueError):
      T.oracle_score(bad, "1")
  with pytest.raises(ValueError, match="must be a str"):
    T.oracle_score(None, "1")


def test_format_example_and_generated_answers_score_one():
  cfg = T.TaskConfig(knowledge=True, demo_error_rate=0.0, demo_policy="abstain_unknown", **SMALL)
  for d in T.demonstrations(cfg):
    assert d["prompt"].endswith(T.SEP) and T.is_exact(d["prompt"], d["response"])
    assert T.format_example(d["prompt"], d["response"]) == d["prompt"] + " " + d["response"]
    assert T.oracle_score(d["prompt"], d["response"] + "x") < 1.0


# ------------------------------------------------------------------------------------------------ data regime


def test_files_deterministic_and_seed_dependent(tmp_path):
  cfg = T.TaskConfig(knowledge=True, **SMALL)
  a, b = T.generate_all(cfg, str(tmp_path / "a")), T.generate_all(cfg, str(tmp_path / "b"))
  c = T.generate_all(dataclasses.replace(cfg, seed=1), str(tmp_path / "c"))
  assert set(a) == {"config", "corpus", "demonstrations", "rl_prompts", "heldout_prompts", "comparison_prompts"}
  for key in a:
    assert open(a[key], "rb").read() == open(b[key], "rb").read(), key
    assert open(a[key], "rb").read() != open(c[key], "rb").read(), key


def test_files_are_json_lines_with_right_fields(tmp_path):
  cfg = T.TaskConfig(knowledge=True, **SMALL)
  paths = T.generate_all(cfg, str(tmp_path))
  fields = {"demonstrations": {"prompt", "response"}, "rl_prompts": {"prompt"}, "heldout_prompts": {"prompt"},
            "comparison_prompts": {"prompt"}}
  sizes = {"demonstrations": cfg.num_demonstrations, "rl_prompts": cfg.num_rl_prompts,
           "heldout_prompts": cfg.num_heldout_prompts, "comparison_prompts": cfg.num_comparison_prompts}
  for key, want in fields.items():
    records = [json.loads(line) for line in open(paths[key], encoding="utf-8")]
    assert len(records) == sizes[key]
    assert all(set(r) == want and all(isinstance(v, str) for v in r.values()) for r in records), key
  docs = open(paths["corpus"], encoding="utf-8").read().split("\n")
  assert docs[-1] == "" and len(docs) - 1 == cfg.num_corpus_docs and all(docs[:-1])
  assert json.load(open(paths["config"]))["seed"] == cfg.seed


def test_splits_are_disjoint():
  cfg = T.TaskConfig(**SMALL)
  demo = {d["prompt"] for d in T.demonstrations(cfg)}
  rl, held = set(T.split_prompts(cfg, "rl")), set(T.split_prompts(cfg, "heldout"))
  assert demo and rl and held
  assert not (demo & rl) and not (demo & held) and not (rl & held)
  # The RM's own comparison prompts: distinct, from the train split (so never RL or held-out), not the demos' list.
  comp = T.split_prompts(cfg, "comparisons")
  assert len(comp) == len(set(comp)) == cfg.num_comparison_prompts
  assert not (set(comp) & rl) and not (set(comp) & held) and set(comp) - demo
  assert T.split_prompts(dataclasses.replace(cfg, num_comparison_prompts=0), "comparisons") == []
  # Held-out and RL instances never appear in the corpus either (add: the operand pairs of its statements).
  add_cfg = dataclasses.replace(cfg, operations=("add",), filler_fraction=0.0, corpus_noise_rate=0.0)
  stated = {tuple(map(int, re.findall(r"[0-9]+", s)[:2])) for doc in T.corpus_documents(add_cfg)
            for s in doc.split(". ")}
  for split in ("rl", "heldout"):
    pairs = {tuple(map(int, re.findall(r"[0-9]+", p))) for p in T.split_prompts(add_cfg, split)}
    assert pairs and not (pairs & stated), split


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.6, 1.0])
def test_demonstration_error_rate(rate):
  cfg = T.TaskConfig(num_demonstrations=3000, demo_error_rate=rate)
  demos = T.demonstrations(cfg)
  wrong = np.mean([not T.is_exact(d["prompt"], d["response"]) for d in demos])
  assert _within(wrong, rate, len(demos)) if 0 < rate < 1 else wrong == rate
  if rate == 1.0:  # plausible errors: most keep partial credit
    assert np.mean([T.oracle_score(d["prompt"], d["response"]) > 0 for d in demos]) > 0.5


def test_corpus_noise_rate_and_character_coverage():
  cfg = T.TaskConfig(operations=("add",), filler_fraction=0.0, corpus_noise_rate=0.2, num_corpus_docs=800)
  sums = [tuple(map(int, re.findall(r"[0-9]+", s))) for doc in T.corpus_documents(cfg) for s in doc.split(". ")]
  assert all(len(s) == 3 for s in sums)
  assert _within(np.mean([x + y != z for x, y, z in sums]), 0.2, len(sums))
  full = T.TaskConfig(knowledge=True, **SMALL)
  corpus_chars = set("".join(T.corpus_documents(full)))
  used = set("".join(d["prompt"] + " " + d["response"] for d in T.demonstrations(full)))
  assert used <= corpus_chars, used - corpus_chars
  assert "\n" not in "".join(T.corpus_documents(full))


# ------------------------------------------------------------------------------------------------ comparisons file


def test_write_comparisons_checks_records(tmp_path):
  good = {"prompt": "add: 48+17 =", "responses": ["65", "6"], "ranking": [np.int64(0), 1]}
  path = T.write_comparisons(str(tmp_path / "c.jsonl"), [good])
  assert [json.loads(line) for line in open(path)] == [{"prompt": "add: 48+17 =", "responses": ["65", "6"],
                                                          "ranking": [0, 1]}]
  for bad in [{**good, "ranking": [0, 0]}, {**good, "ranking": [0]}, {**good, "responses": ["65"], "ranking": [0]},
              {"prompt": "p", "responses": ["a", "b"]}, {**good, "ranking": [True, False]}, "not a dict"]:
    with pytest.raises(ValueError, match="record 1"):
      T.write_comparisons(str(tmp_path / "bad.jsonl"), [good, bad])


# ------------------------------------------------------------------------------------------------ registry, config


def test_register_family_extends_every_product():
  fam = T.Family(name="mirror", pattern=r"mirror: (?P<s>[a-z]+)",
                 sample=lambda rng, cfg: "mirror: " + "".join(rng.choice(list("abc"), 4)),
                 answer=lambda a: a["s"][::-1] + a["s"], score=lambda a, r: float(r == a["s"][::-1] + a["s"]),
                 corrupt=lambda a, ans, rng: ans[1:], templates=("{s} mirrored is {a}.",))
  T.register_family(fam)
  try:
    with pytest.raises(ValueError, match="taken"):
      T.register_family(fam)
    cfg = T.TaskConfig(operations=("mirror",), demo_error_rate=0.0, corpus_noise_rate=0.0, **SMALL)
    assert all(T.is_exact(d["prompt"], d["response"]) for d in T.demonstrations(cfg))
    stated = re.findall(r"(\w+) mirrored is (\w+)\.", " ".join(T.corpus_documents(cfg)))
    assert stated and all(a == s[::-1] + s for s, a in stated)
    assert T.oracle_score("mirror: ab =", "baab") == 1.0
    assert not set(T.split_prompts(cfg, "heldout")) & {d["prompt"] for d in T.demonstrations(cfg)}
  finally:
    T.FAMILIES.pop("mirror")


@pytest.mark.parametrize("field,value", [
    ("seed", -1), ("num_demonstrations", 0), ("heldout_fraction", 0.0), ("rl_fraction", 0.95),
    ("demo_error_rate", 1.5), ("num_candidates", 1), ("min_items", 1), ("max_items", 9), ("max_sentences", 2),
    ("demo_policy", "oracle"), ("operations", ("reverse", "mul")), ("operations", ("ask",)), ("num_entities", 7),
    ("num_entities", 4), ("num_comparison_prompts", -1)])
def test_config_errors_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"TaskConfig.*{field}"):
    T.TaskConfig(**{field: value})
  with pytest.raises(ValueError, match="split="):
    T.split_prompts(T.TaskConfig(), "train")
