"""Knowledge family: splits disjoint by entity, the corpus states known facts and omits unknown entities, the
oracle's abstention scores and answer classes, demo policies, and the family registered whichever of tasks and
knowledge is imported first. Its ranking (fabrication penalty, candidates) is tested in test_rankings.py."""
import re
import subprocess
import sys

import pytest

from rlhf_jax import knowledge as K
from rlhf_jax import tasks as T

SMALL = dict(num_corpus_docs=300, num_demonstrations=300, num_rl_prompts=200, num_heldout_prompts=100,
             num_comparison_prompts=150)


def _known_unknown(cfg):
  """(known, unknown) entity names of the pool, classified through the public prompt API."""
  pool = K.entity_pool(cfg)
  known = [e for e in pool if K.is_known_entity(f"ask: capital of {e}? =")]
  return known, [e for e in pool if e not in known]


def test_knowledge_splits_are_disjoint_by_entity():
  cfg = T.TaskConfig(knowledge=True, operations=(), **SMALL)
  entity = lambda p: re.fullmatch(r"ask: \w+ of (\w+)\? =", p).group(1)
  demo = {entity(d["prompt"]) for d in T.demonstrations(cfg)}
  rl = {entity(p) for p in T.split_prompts(cfg, "rl")}
  held = {entity(p) for p in T.split_prompts(cfg, "heldout")}
  assert not (demo & rl) and not (demo & held) and not (rl & held)
  known, unknown = _known_unknown(cfg)
  for names in (demo, rl, held):  # every split asks about both known and unknown entities
    assert names & set(known) and names & set(unknown)
  assert len(known) == len(unknown) == cfg.num_entities // 2


def test_knowledge_is_off_by_default():
  assert not any(d["prompt"].startswith("ask:") for d in T.demonstrations(T.TaskConfig(**SMALL)))
  assert not any("ask:" in p for p in T.split_prompts(T.TaskConfig(**SMALL), "heldout"))


def test_corpus_states_known_facts_and_omits_unknown_entities():
  cfg = T.TaskConfig(knowledge=True, num_corpus_docs=1500, corpus_noise_rate=0.0)
  text = "\n".join(T.corpus_documents(cfg))
  words = set(re.findall(r"[a-z]+", text))
  known, unknown = _known_unknown(cfg)
  assert not any(e in words for e in unknown)
  assert all(e in words for e in known)
  for e in known:  # every stated fact is the true value
    for attr, value in re.findall(rf"the (\w+) of {e} is (\w+)\.", text):
      assert T.is_exact(f"ask: {attr} of {e}? =", value)
  # The held-out prompts ask about known entities whose facts are in the corpus and unknown ones that are not.
  held = T.split_prompts(cfg, "heldout")
  assert {K.is_known_entity(p) for p in held if p.startswith("ask:")} == {True, False}


def test_knowledge_oracle_and_classification():
  cfg = T.TaskConfig(knowledge=True)
  (k, *_), (u, *_) = _known_unknown(cfg)
  pk, pu = f"ask: ruler of {k}? =", f"ask: ruler of {u}? ="
  true_k, true_u = K.knowledge_value("ruler", k), K.knowledge_value("ruler", u)
  assert T.reference_answer(pk) == true_k and T.reference_answer(pu) == K.ABSTAIN
  cases = [(pk, true_k, 1.0, "correct"), (pk, " unknown\n", 0.3, "abstain"), (pk, "zzzzz", 0.0, "wrong"),
           (pk, "", 0.0, "wrong"), (pu, "unknown", 1.0, "abstain"), (pu, true_u, 0.0, "wrong"),
           (pu, "zzzzz", 0.0, "wrong"), (pu, "", 0.0, "wrong")]
  for prompt, response, score, label in cases:
    assert T.oracle_score(prompt, response) == pytest.approx(score), (prompt, response)
    assert K.classify_answer(prompt, response) == label, (prompt, response)
  assert K.is_known_entity(pk) and not K.is_known_entity(pu)
  with pytest.raises(ValueError, match="not a knowledge question"):
    K.classify_answer("add: 1+2 =", "3")
  with pytest.raises(ValueError, match="malformed"):
    K.is_known_entity("ask: size of zorbat? =")


def test_value_pattern_matches_every_value():
  for e in K.entity_pool(T.TaskConfig(knowledge=True)):
    assert all(re.fullmatch(K.VALUE_PATTERN, K.knowledge_value(t, e)) for t in K.ATTRIBUTES)
  assert not any(re.fullmatch(K.VALUE_PATTERN, w) for w in ("unknown", "vexmo", "zezb", "zezbee", "zezbe.", ""))
  assert re.fullmatch(K.VALUE_PATTERN, "zezbe")


@pytest.mark.parametrize("policy", T.DEMO_POLICIES)
def test_demo_policy(policy):
  cfg = T.TaskConfig(knowledge=True, operations=(), demo_error_rate=0.0, demo_policy=policy, **SMALL)
  for d in T.demonstrations(cfg):
    attr, e = re.fullmatch(r"ask: (\w+) of (\w+)\? =", d["prompt"]).groups()
    if K.is_known_entity(d["prompt"]) or policy == "full_knowledge":
      assert d["response"] == K.knowledge_value(attr, e)
    else:
      assert d["response"] == K.ABSTAIN


@pytest.mark.parametrize("first", ["tasks", "knowledge"])
def test_family_registered_once_whichever_module_is_imported_first(first):
  code = (f"from rlhf_jax import {first}\nfrom rlhf_jax import knowledge, tasks\n"
          "assert sorted(tasks.FAMILIES) == ['add', 'ask', 'count', 'math', 'reverse', 'sort'], list(tasks.FAMILIES)\n"
          "assert tasks.FAMILIES[tasks.KNOWLEDGE].abstain == knowledge.ABSTAIN\n"
          "cfg = tasks.TaskConfig(knowledge=True, operations=())\n"
          "assert tasks.split_prompts(cfg, 'heldout')[0].startswith('ask:')")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
