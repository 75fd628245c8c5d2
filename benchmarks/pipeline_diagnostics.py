"""Why PPO does (not) beat SFT on the embedded task: what each policy can do, and what the RM can tell apart.

  python -m benchmarks.pipeline_diagnostics --workdir=/tmp/s2/final [--policies=/tmp/other/ppo,...]

Prints, on the held-out prompts of a finished pipeline workdir (runs in the library's own venv, no peers):
1. per task family, the SFT policy's oracle score greedy and sampled (`--samples` per prompt, temperature 1), and
   the best of those samples picked by the oracle (the headroom re-weighting SFT's own samples could give) and by
   the RM (what the RM can select: best-of-n with the RM), and by SFT's own log-likelihood (no comparisons at all);
2. per policy (`workdir/sft`, `workdir/ppo` and `--policies`), the sampled / greedy oracle score and KL to SFT,
   each sampled figure a mean over `--samples` samples of every prompt (one sample of 200 prompts has a
   standard error of ~3 points).
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging

from rlhf_jax import evaluate, pipeline, stages, tasks

WORKDIR = flags.DEFINE_string("workdir", None, "finished pipeline workdir", required=True)
POLICIES = flags.DEFINE_list("policies", [], "more policy workdirs (pretrain/SFT/PPO) to evaluate")
SAMPLES = flags.DEFINE_integer("samples", 8, "temperature-1 samples per held-out prompt")
_DEFAULTS = pipeline.config()
PROMPT_LEN, NEW_TOKENS = _DEFAULTS.rl.data.prompt_len, _DEFAULTS.ppo.max_new_tokens
RM_SEQ_LEN = _DEFAULTS.reward.data.seq_len


def family_table(wd: str, prompts: list[str], n: int) -> list[str]:
  """Per family: greedy, sampled mean, oracle-best-of-n and RM-best-of-n oracle scores of the SFT policy."""
  model, params, tok = stages.load_policy(os.path.join(wd, "sft"))
  rm_cfg, rm_params, _ = stages.load_reward_model(os.path.join(wd, "reward"))
  greedy, _ = evaluate.generate(params, model, tok, prompts, prompt_len=PROMPT_LEN, max_new_tokens=NEW_TOKENS,
                                greedy=True)
  runs = [evaluate.generate(params, model, tok, prompts, prompt_len=PROMPT_LEN, max_new_tokens=NEW_TOKENS,
                            greedy=False, seed=100 + s) for s in range(n)]
  samples = [texts for texts, _ in runs]
  logp_PxN = np.stack([np.concatenate([np.sum(np.asarray(b.logprobs_BxT) * np.asarray(b.mask_BxT), 1) for b in bs])
                       for _, bs in runs], 1)  # log π_SFT(y|x) of each sample
  oracle_PxN = np.array([[tasks.oracle_score(p, s[i]) for s in samples] for i, p in enumerate(prompts)])
  rm_PxN = np.stack([stages.score_texts(rm_params, rm_cfg, tok, prompts, s, RM_SEQ_LEN) for s in samples], 1)
  rows = {"greedy": np.array([tasks.oracle_score(p, g) for p, g in zip(prompts, greedy)]),
          "sampled": oracle_PxN.mean(1), f"oracle-best-of-{n}": oracle_PxN.max(1),
          f"RM-best-of-{n}": oracle_PxN[np.arange(len(prompts)), rm_PxN.argmax(1)],
          f"SFT-likelihood-best-of-{n}": oracle_PxN[np.arange(len(prompts)), logp_PxN.argmax(1)]}
  families = np.array([tasks.parse_prompt(p)[0].name for p in prompts])
  out = ["| SFT, family | prompts | " + " | ".join(rows) + " |", "|---" * (len(rows) + 2) + "|"]
  for fam in sorted(set(families)) + ["all"]:
    sel = families == fam if fam != "all" else np.ones(len(prompts), bool)
    out.append(f"| {fam} | {int(sel.sum())} | " + " | ".join(f"{v[sel].mean():.3f}" for v in rows.values()) + " |")
  return out


def policy_table(wd: str, policies: list[str], prompts: list[str], n: int) -> list[str]:
  """Sampled (mean over n samples per prompt) and greedy oracle score, exact match, KL to SFT, corpus loss."""
  _, sft_params, tok = stages.load_policy(os.path.join(wd, "sft"))
  out = ["| policy | oracle_sampled | exact_sampled | oracle_greedy | kl_to_sft | corpus_loss |",
         "|---|---|---|---|---|---|"]
  for d in policies:
    model, params, _ = stages.load_policy(d)
    m = evaluate.evaluate_policy(params, model, tok, prompts, oracle=tasks.oracle_score, exact=tasks.is_exact,
                                 prompt_len=PROMPT_LEN, max_new_tokens=NEW_TOKENS, ref_params=sft_params,
                                 samples_per_prompt=n, seed=3)
    lm = evaluate.corpus_loss(params, model, tok, os.path.join(wd, "data", "corpus.txt"))
    out.append(f"| {d} | {m['oracle_sampled']:.3f} | {m['exact_sampled']:.3f} | {m['oracle_greedy']:.3f} | "
               f"{m['kl_to_sft']:.2f} | {lm:.2f} |")
    print(out[-1], flush=True)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  wd = WORKDIR.value
  with open(os.path.join(wd, "data", "heldout_prompts.jsonl")) as f:
    prompts = [json.loads(line)["prompt"] for line in f]
  print("\n".join(family_table(wd, prompts, SAMPLES.value)), flush=True)
  policies = [os.path.join(wd, s) for s in ("pretrain", "sft", "ppo")] + POLICIES.value
  policy_table(wd, policies, prompts, SAMPLES.value)


if __name__ == "__main__":
  app.run(main)
