"""Hallucination grid on the knowledge task: SFT demonstration policy × fabrication penalty in the RM data.

  python -m experiments.hallucination --config=experiments/configs/hallucination.py --workdir=workdir/hallucination

Runs one pipeline per cell (shared pretraining), then per stage (pretrain, SFT, PPO) and cell the held-out
accuracy on known entities, fabrication and abstention on unknown ones, and over-abstention on known ones.
Writes hallucination.md (table), hallucination.png (bar chart) and hallucination_results.json under --workdir.
Re-running the same command resumes: finished stages are skipped.
"""
from experiments import launch
from rlhf_jax import hallucination

if __name__ == "__main__":
  launch.run(hallucination.run)
