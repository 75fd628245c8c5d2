"""How well each ranker orders the pipeline's held-out comparisons: reward models vs rankers that need no training.

  python -m benchmarks.rm_rankers --workdir=/tmp/w/final [--rms=/tmp/other/reward,...]

Pairwise accuracy against the held-out comparisons' (noisy) rankings (`data/comparisons_heldout.jsonl`: SFT samples
of held-out prompts ranked by the oracle with label noise), per task family and per pair type (one side exactly right
vs both wrong), for: the oracle itself (the ceiling the label noise leaves), the SFT policy's own log-likelihood
Σ_t log π_SFT(y_t | x, y_<t) of the response and eos (no comparisons at all), and each RM (`workdir/reward` and
`--rms`). Ties count one half. Runs in the library's own venv.
"""
from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from rlhf_jax import pipeline, stages, tasks

WORKDIR = flags.DEFINE_string("workdir", None, "finished pipeline workdir", required=True)
RMS = flags.DEFINE_list("rms", [], "more reward-model workdirs (same tokenizer) to rank with")
RM_SEQ_LEN = pipeline.config().reward.data.seq_len


def likelihood_ranker(model, sft_params) -> dict:
  """RM-shaped params whose score is Σ log π_SFT over the response tokens: a zero head plus the likelihood feature."""
  params = stages.fresh_reward_params(model, jax.random.PRNGKey(0), backbone=sft_params, loglik=True)
  return {**params, "head": jax.tree.map(jnp.zeros_like, params["head"]), "loglik": jnp.float32(1.0)}


def accuracy_table(records: list[dict], scores: dict[str, dict]) -> list[str]:
  """Markdown rows: per group (all, family, pair type) the pairs and each ranker's pairwise accuracy."""
  hits: dict[str, dict[str, list]] = {}
  for r in records:
    family = tasks.parse_prompt(r["prompt"])[0].name
    for a, b in itertools.combinations(r["ranking"], 2):  # a ranked above b
      w, l = (r["prompt"], r["responses"][a]), (r["prompt"], r["responses"][b])
      kind = "one right" if tasks.is_exact(*w) or tasks.is_exact(*l) else "both wrong"
      for group in ("all", family, kind):
        row = hits.setdefault(group, {name: [] for name in scores})
        for name, s in scores.items():
          row[name].append(1.0 if s[w] > s[l] else 0.5 if s[w] == s[l] else 0.0)
  out = ["| pairs | n | " + " | ".join(scores) + " |", "|---" * (len(scores) + 2) + "|"]
  for group, row in hits.items():
    out.append(f"| {group} | {len(row[next(iter(scores))])} | " +
               " | ".join(f"{np.mean(v):.3f}" for v in row.values()) + " |")
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  wd = WORKDIR.value
  with open(os.path.join(wd, "data", "comparisons_heldout.jsonl")) as f:
    records = [json.loads(line) for line in f]
  pairs = [(r["prompt"], x) for r in records for x in r["responses"]]
  prompts, responses = [p for p, _ in pairs], [x for _, x in pairs]
  model, sft_params, tok = stages.load_policy(os.path.join(wd, "sft"))
  scores = {"oracle": dict(zip(pairs, (tasks.oracle_score(p, x) for p, x in pairs))),
            "SFT log-likelihood": dict(zip(pairs, stages.score_texts(likelihood_ranker(model, sft_params), model, tok,
                                                                      prompts, responses, RM_SEQ_LEN)))}
  for rm in [os.path.join(wd, "reward")] + RMS.value:
    rm_cfg, rm_params, _ = stages.load_reward_model(rm)
    scores[f"RM {rm}"] = dict(zip(pairs, stages.score_texts(rm_params, rm_cfg, tok, prompts, responses, RM_SEQ_LEN)))
  print("\n".join(accuracy_table(records, scores)))


if __name__ == "__main__":
  app.run(main)
