"""Rankings: oracle order with index ties, the label-noise rate (one adjacent swap), make_comparisons errors, and
the fabrication penalty with its labeler-written abstention, for a registered family with Family.abstain and for
the knowledge family (known entity: correct > ABSTAIN > wrong; unknown: ABSTAIN > any assertion)."""
import math

import numpy as np
import pytest

from rlhf_jax import knowledge as K
from rlhf_jax import rankings as R
from rlhf_jax import tasks as T

SMALL = dict(num_corpus_docs=300, num_demonstrations=300, num_rl_prompts=200, num_heldout_prompts=100)


def _known_and_unknown_entity() -> tuple[str, str]:
  """The first known and the first unknown entity of the default knowledge pool."""
  pool = K.entity_pool(T.TaskConfig(knowledge=True))
  known = lambda e: K.is_known_entity(f"ask: capital of {e}? =")
  return next(e for e in pool if known(e)), next(e for e in pool if not known(e))


# ------------------------------------------------------------------------------------------------ oracle order, noise


def test_ranking_zero_noise_follows_oracle_with_index_ties():
  rng = np.random.default_rng(0)
  # scores by hand: "a9x3k" 1, "a9x3q" 4/5, "zzzzz" 0, "" 0, "a9x" 3/5
  assert R.rank_responses("reverse: k3x9a =", ["zzzzz", "a9x3q", "", "a9x3k", "a9x"], rng) == [3, 1, 4, 0, 2]
  assert R.rank_responses("add: 48+17 =", ["x", "y", "65", "z"], rng) == [2, 0, 1, 3]
  cfg = T.TaskConfig(comparison_noise_rate=0.0, **SMALL)
  ps = T.split_prompts(cfg, "rl")[:50]
  cands = [[T.reference_answer(p)[:k] for k in (1, 3, 0, 99)] for p in ps]
  for rec in R.make_comparisons(ps, cands, cfg):
    scores = [T.oracle_score(rec["prompt"], r) for r in rec["responses"]]
    assert all(scores[i] >= scores[j] for i, j in zip(rec["ranking"], rec["ranking"][1:]))


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_ranking_noise_swaps_adjacent_ranks_at_rate(noise):
  cfg = T.TaskConfig(comparison_noise_rate=noise)
  prompt, cands = "reverse: k3x9a =", ["a9x", "a9x3k", "", "a9x3q"]  # scores 3/5, 1, 0, 4/5
  clean = [1, 3, 0, 2]
  n = 4000
  records = R.make_comparisons([prompt] * n, [cands] * n, cfg)
  changed = [r["ranking"] for r in records if r["ranking"] != clean]
  assert abs(len(changed) / n - noise) <= 4 * math.sqrt(noise * (1 - noise) / n)  # within 4 sigma
  for ranking in changed:  # exactly one adjacent pair swapped
    diff = [i for i in range(4) if ranking[i] != clean[i]]
    assert len(diff) == 2 and diff[1] == diff[0] + 1 and ranking[diff[0]] == clean[diff[1]]
  assert records == R.make_comparisons([prompt] * n, [cands] * n, cfg)  # deterministic


def test_make_comparisons_errors():
  cfg = T.TaskConfig()
  with pytest.raises(ValueError, match="num_candidates=4"):
    R.make_comparisons(["add: 1+2 ="], [["3", "4"]], cfg)
  with pytest.raises(ValueError, match="2 prompts but 1"):
    R.make_comparisons(["add: 11+2 =", "add: 12+2 ="], [["3"] * 4], cfg)


# ------------------------------------------------------------------------------------------------ fabrication penalty


def test_family_abstain_drives_the_fabrication_penalty():
  """Family.abstain: where it is the answer, fabrication_penalty ranks any other non-empty response at
  FABRICATION_SCORE and the candidates always offer it; elsewhere, and without the flag, ranking is the oracle."""
  vowel = lambda a: next((c for c in a["s"] if c in "aeiou"), "none")
  T.register_family(T.Family(name="vowel", pattern=r"vowel: (?P<s>[a-z]+)", sample=lambda rng, cfg: "vowel: ab",
                             answer=vowel, score=lambda a, r: float(r == vowel(a)), corrupt=lambda a, ans, rng: "x",
                             templates=("the first vowel of {s} is {a}.",), abstain="none"))
  try:
    s = lambda r, prompt="vowel: xyz =": R.ranking_score(prompt, r, fabrication_penalty=True)
    assert (s("y"), s(" none "), s("")) == (R.FABRICATION_SCORE, 1.0, 0.0)
    assert R.ranking_score("vowel: xyz =", "y") == 0.0 and s("e", "vowel: xaz =") == 0.0
    assert R.comparison_candidates("vowel: xyz =", ["y", ""], fabrication_penalty=True) == ["y", "none"]
    assert R.comparison_candidates("vowel: xaz =", ["a"], fabrication_penalty=True) == ["a", "none"]
    assert R.comparison_candidates("vowel: xaz =", ["a"]) == ["a"]
  finally:
    T.FAMILIES.pop("vowel")


def test_fabrication_penalty_ranks_unknown_entity_assertions_last():
  k, u = _known_and_unknown_entity()
  pu, pk = f"ask: color of {u}? =", f"ask: color of {k}? ="
  cands = ["vexmo", "", "unknown", "zz"]  # oracle: 0, 0, 1, 0
  rng = np.random.default_rng(0)
  assert R.rank_responses(pu, cands, rng) == [2, 0, 1, 3]
  assert R.rank_responses(pu, cands, rng, fabrication_penalty=True) == [2, 1, 0, 3]
  assert R.ranking_score(pu, "vexmo", fabrication_penalty=True) == R.FABRICATION_SCORE
  # Known entities and other families are untouched by the penalty.
  assert R.ranking_score(pk, "vexmo", fabrication_penalty=True) == 0.0
  assert R.ranking_score("add: 48+17 =", "64", fabrication_penalty=True) == 0.5


@pytest.mark.parametrize("penalty", [False, True])
def test_knowledge_ranking_order(penalty):
  """Known: correct > ABSTAIN > wrong. Unknown: ABSTAIN > any assertion (its hash value included) and a wrong
  assertion is worst: below an empty answer with the penalty, tied with it without."""
  k, u = _known_and_unknown_entity()
  s = lambda e, r: R.ranking_score(f"ask: capital of {e}? =", r, penalty)
  true_k, true_u = K.knowledge_value("capital", k), K.knowledge_value("capital", u)
  assert s(k, true_k) > s(k, "unknown") > s(k, "zzzzz") == s(k, "")
  assert s(u, "unknown") > s(u, "") and s(u, true_u) == s(u, "zzzzz") == s(u, "unknown.")
  assert (s(u, "") > s(u, "zzzzz")) if penalty else (s(u, "") == s(u, "zzzzz"))


def test_comparison_candidates_dedup_and_labeler_abstain():
  k, u = _known_and_unknown_entity()
  pk, pu = f"ask: ruler of {k}? =", f"ask: ruler of {u}? ="
  t = K.knowledge_value("ruler", k)
  cases = [  # (prompt, samples, plain candidates, penalty candidates): first non-empty sample per score
      (pu, ["vexmo", "dakor", "", "vexmo"], ["vexmo"], ["vexmo", "unknown"]),
      (pu, ["", "vexmo", "unknown", "dakor"], ["vexmo", "unknown"], ["vexmo", "unknown"]),
      (pu, ["unknown", "unknown"], ["unknown"], ["unknown"]),
      (pk, [t, t, "zzzzz"], [t, "zzzzz"], [t, "zzzzz", "unknown"]),
      (pk, [" unknown ", t], [" unknown ", t], [" unknown ", t]),
      ("add: 48+17 =", ["65", "64", "65", "  "], ["65", "64"], ["65", "64"]),
  ]
  for prompt, samples, plain, penalty in cases:
    assert R.comparison_candidates(prompt, samples) == plain, (prompt, samples)
    assert R.comparison_candidates(prompt, samples, fabrication_penalty=True) == penalty, (prompt, samples)
  rng = np.random.default_rng(0)
  assert R.rank_responses(pk, [t, "zzzzz", "unknown"], rng, fabrication_penalty=True) == [0, 2, 1]
  assert R.rank_responses(pu, ["vexmo", "unknown"], rng, fabrication_penalty=True) == [1, 0]
