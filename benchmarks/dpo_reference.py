"""DPO's reference log-probs: precomputed once per record (cached) vs on the fly in every step, side by side.

Runs the DPO stage twice from the same SFT workdir on the same comparisons (the pipeline's: `make demo`'s
workdir/demo/sft and data/comparisons_train.jsonl), `--steps` steps at the pipeline RM stage's batch (16 elements
of Kmax x 48 slots), once per mode, each in a fresh workdir, and prints for each: the reference pass, the training
loop (compile included) and steady steps/s, then on-the-fly / precompute for the whole stage at `--steps` and
extrapolated to `--project_steps`.

Command: .venv/bin/python -m benchmarks.dpo_reference --pipeline=workdir/demo [--steps 60] [--project_steps 500]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks import common  # noqa: F401  (thread pinning before jax)

from rlhf_jax import dpo  # noqa: E402


def _cfg(args, mode: str):
  cfg = dpo.config()
  cfg.data.update(train=os.path.join(args.pipeline, "data", "comparisons_train.jsonl"), eval="", seq_len=48,
                  batch_size=16, max_responses=args.max_responses)
  cfg.dpo.ref_logp = mode
  cfg.train.update(init_from=os.path.join(args.pipeline, "sft"), num_steps=args.steps, log_every=10,
                   eval_every=0, checkpoint_every=args.steps)
  return cfg


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pipeline", default="workdir/demo", help="a finished pipeline workdir (sft/, data/)")
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--project_steps", type=int, default=500, help="the pipeline's RM stage length")
  ap.add_argument("--max_responses", type=int, default=4)
  args = ap.parse_args()
  out = {}
  for mode in ("precompute", "on_the_fly"):
    with tempfile.TemporaryDirectory() as wd:
      t0 = time.perf_counter()
      if mode == "precompute":  # the pass run_dpo runs first, timed on its own (the records' tfds cache included)
        from rlhf_jax import stages
        model, params, tok = stages.load_policy(_cfg(args, mode).train.init_from)
        dpo.cached_reference_logps(params, model, tok, [_cfg(args, mode).data.train], _cfg(args, mode), wd)
      t1 = time.perf_counter()
      last = dpo.run_dpo(_cfg(args, mode), wd)  # loads the cache just written
      t2 = time.perf_counter()
      out[mode] = dict(ref_s=t1 - t0, loop_s=t2 - t1, steps_per_s=last["steps_per_s"])
      print(f"{mode:11s} reference pass {t1 - t0:6.1f}s  stage {t2 - t1:6.1f}s  steady {last['steps_per_s']:.2f} "
            f"steps/s", flush=True)
  pre, fly = out["precompute"], out["on_the_fly"]
  total = lambda m, steps: m["ref_s"] + m["loop_s"] + (steps - args.steps) / m["steps_per_s"]
  print(f"on_the_fly / precompute, whole stage at {args.steps} steps: "
        f"{total(fly, args.steps) / total(pre, args.steps):.2f}; at {args.project_steps} steps (extrapolated at "
        f"the steady rates): {total(fly, args.project_steps) / total(pre, args.project_steps):.2f}; steady step "
        f"time ratio {pre['steps_per_s'] / fly['steps_per_s']:.2f}")


if __name__ == "__main__":
  main()
