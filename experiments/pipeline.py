"""The main job: task data -> tokenizer -> pretrain -> SFT -> RM -> PPO-ptx -> held-out table, plots, report.md.

  python -m experiments.pipeline --config=experiments/configs/pipeline.py --workdir=workdir/demo
  python -m experiments.pipeline --config=experiments/configs/pipeline.py --workdir=workdir/no_kl \
      --config.ppo.kl_coef=0

Re-running the same command resumes: finished stages are skipped.
"""
from experiments import launch
from rlhf_jax import pipeline

if __name__ == "__main__":
  launch.run(pipeline.run)
