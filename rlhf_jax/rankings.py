"""How labelers rank K responses with the oracle: the comparisons (RM data) of the embedded task (rlhf_jax/tasks.py).

A ranking orders responses best first by `ranking_score`, the oracle score (ties: lower index first); with
probability TaskConfig.comparison_noise_rate one adjacent pair of ranks is swapped (label noise).

A family may have an abstention answer (Family.abstain; knowledge: "unknown" for an entity absent from the corpus).
With TaskConfig.fabrication_penalty the comparisons penalise fabrication explicitly: where the answer is to abstain,
any assertion ranks at FABRICATION_SCORE, below even an empty answer, and `comparison_candidates` adds the
labeler-written abstention to every comparison of such a family (without it, a policy that never abstains yields no
comparison that ranks abstaining above a fabrication, and the flag would change nothing).

`make_comparisons` draws its noise from the TaskConfig's own "comparisons" rng stream; tasks.write_comparisons
writes the records.
"""
from __future__ import annotations

import numpy as np

from rlhf_jax import tasks
from rlhf_jax.tasks import TaskConfig

FABRICATION_SCORE = -1.0  # ranking score, with fabrication_penalty, of an assertion where the answer is to abstain


def ranking_score(prompt: str, response, fabrication_penalty: bool = False) -> float:
  """Oracle score; with fabrication_penalty an assertion where the answer is Family.abstain scores FABRICATION_SCORE
  (knowledge: any answer but ABSTAIN about an unknown entity)."""
  score = tasks.oracle_score(prompt, response)
  if fabrication_penalty:
    family, args = tasks.parse_prompt(prompt)
    asserted = response.strip() if isinstance(response, str) else ""
    if family.abstain is not None and family.answer(args) == family.abstain and asserted not in ("", family.abstain):
      return FABRICATION_SCORE
  return score


def rank_responses(prompt: str, responses: list[str], rng: np.random.Generator, noise_rate: float = 0.0,
                   fabrication_penalty: bool = False) -> list[int]:
  """Response indices best first by ranking_score (ties: lower index first); with probability noise_rate one
  uniformly chosen adjacent pair of ranks is swapped."""
  scores = [ranking_score(prompt, r, fabrication_penalty) for r in responses]
  order = sorted(range(len(responses)), key=lambda i: (-scores[i], i))
  if len(order) > 1 and rng.random() < noise_rate:
    i = int(rng.integers(len(order) - 1))
    order[i], order[i + 1] = order[i + 1], order[i]
  return order


def comparison_candidates(prompt: str, samples: list[str], fabrication_penalty: bool = False) -> list[str]:
  """The responses a labeler ranks from K samples: the first non-empty sample of each distinct ranking_score.

  With fabrication_penalty a knowledge question also gets the labeler-written ABSTAIN (its Family.abstain) when no
  sample abstained, so the RM data ranks every fabrication (unknown entity) and every wrong answer (known entity)
  below abstaining, and abstaining below the true value of a known entity, even when the sampling policy never
  abstains.
  """
  by_score = {}
  for r in samples:
    if isinstance(r, str) and r.strip():
      by_score.setdefault(round(ranking_score(prompt, r, fabrication_penalty), 6), r)
  abstain = tasks.parse_prompt(prompt)[0].abstain if fabrication_penalty else None
  if abstain is not None:
    by_score.setdefault(round(ranking_score(prompt, abstain, True), 6), abstain)
  return list(by_score.values())


def make_comparisons(prompts: list[str], responses: list[list[str]], cfg: TaskConfig) -> list[dict]:
  """Comparison records {"prompt", "responses", "ranking"} for K sampled responses per prompt."""
  if len(prompts) != len(responses):
    raise ValueError(f"make_comparisons: {len(prompts)} prompts but {len(responses)} response lists")
  rng, records = tasks._rng(cfg, "comparisons"), []
  for i, (prompt, candidates) in enumerate(zip(prompts, responses)):
    if len(candidates) != cfg.num_candidates:
      raise ValueError(f"responses[{i}] has {len(candidates)} candidates; TaskConfig.num_candidates="
                       f"{cfg.num_candidates}")
    ranking = rank_responses(prompt, list(candidates), rng, cfg.comparison_noise_rate, cfg.fabrication_penalty)
    records.append({"prompt": prompt, "responses": list(candidates), "ranking": ranking})
  return records
