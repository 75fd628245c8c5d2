"""Shared tiny pipeline for the stage and PPO tests: task files, pretrain -> SFT -> RM workdirs, built once a process.

Sizes are the smallest that exercise every path: d_model 32, one layer, vocab 320 (sentencepiece with byte
fallback needs >= ~305 pieces on the task corpus), sequences of 48 tokens, global batches of 8 (4 fake devices).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from rlhf_jax import metrics, ppo, stages, tasks

VOCAB = 320
TINY_MODEL = dict(d_model=32, num_heads=2, num_kv_heads=2, d_ff=64, num_layers=1, max_len=64)
TASK = tasks.TaskConfig(num_corpus_docs=300, num_demonstrations=160, num_rl_prompts=64, num_heldout_prompts=64)
RM_STEPS = 30  # the pipeline's RM: held-out accuracy 1.0 after 30 steps (0.97 after 10) on the easy comparisons
GARBAGE = ("the old dog ran.", "yes.", "a busy market", "note: red boat", "the cold river sang", "bird?")

_CACHE: dict = {}


def easy_comparisons(prompts: list[str], seed: int) -> list[dict]:
  """{"prompt", "responses", "ranking"}: the reference answer vs a filler phrase, in random order."""
  rng = np.random.default_rng(seed)
  out = []
  for p in prompts:
    good, bad = tasks.reference_answer(p), GARBAGE[int(rng.integers(len(GARBAGE)))]
    if rng.random() < 0.5:
      out.append({"prompt": p, "responses": [good, bad], "ranking": [0, 1]})
    else:
      out.append({"prompt": p, "responses": [bad, good], "ranking": [1, 0]})
  return out


def task_files(root: str) -> dict[str, str]:
  """The embedded task's files under `root` plus easy train/held-out comparison sets (cached per process)."""
  if "files" in _CACHE:
    return _CACHE["files"]
  files = tasks.generate_all(TASK, os.path.join(root, "task"))
  with open(files["demonstrations"]) as f:
    demo_prompts = [json.loads(line)["prompt"] for line in f]
  with open(files["heldout_prompts"]) as f:
    heldout_prompts = [json.loads(line)["prompt"] for line in f]
  files["comparisons"] = tasks.write_comparisons(os.path.join(root, "task", "comparisons.jsonl"),
                                                 easy_comparisons(demo_prompts, 0))
  files["heldout_comparisons"] = tasks.write_comparisons(os.path.join(root, "task", "heldout_comparisons.jsonl"),
                                                         easy_comparisons(heldout_prompts, 1))
  _CACHE["files"] = files
  return files


def tiny(cfg, steps: int = 3, **model):
  """A stage ConfigDict shrunk to test size (model fields only matter for runs from scratch)."""
  cfg.model.update({**TINY_MODEL, **model})
  cfg.tokenizer.vocab_size = VOCAB
  cfg.data.seq_len = 48
  cfg.data.batch_size = 8
  cfg.train.num_steps = steps
  cfg.train.log_every = 1
  cfg.train.eval_every = 0
  cfg.train.eval_batches = 2
  cfg.opt.warmup_steps = 0
  return cfg


def pretrain_cfg(files, steps: int = 3):
  cfg = tiny(stages.lm_config("pretrain"), steps)
  cfg.data.train = files["corpus"]
  return cfg


def sft_cfg(files, init_from: str, steps: int = 3):
  """SFT with opt.lr = 0: the params stay the init_from ones, so test_stages can check init_from exactly."""
  cfg = tiny(stages.lm_config("sft"), steps)
  cfg.data.train = files["demonstrations"]
  cfg.train.init_from = init_from
  cfg.opt.lr = 0.0
  return cfg


def reward_cfg(files, init_from: str, steps: int = RM_STEPS):
  cfg = tiny(stages.reward_config(), steps)
  cfg.data.train, cfg.data.eval, cfg.data.normalize_on = (files["comparisons"], files["heldout_comparisons"],
                                                          files["demonstrations"])
  cfg.data.max_responses = 2
  cfg.train.init_from, cfg.train.eval_batches = init_from, 0  # all held-out pairs
  cfg.opt.lr = 1e-3
  return cfg


def ppo_cfg(files, sft: str, rm: str, steps: int = 2):
  """Tiny PPO config: 8 prompts of <= 24 tokens, 8 new tokens, 8 ptx rows of 32 tokens."""
  cfg = ppo.config()
  cfg.train.init_from, cfg.ppo.reward_from = sft, rm
  cfg.data.prompts, cfg.data.ptx = files["rl_prompts"], files["corpus"]
  cfg.data.prompt_len, cfg.data.ptx_seq_len, cfg.data.ptx_batch_size = 24, 32, 8
  cfg.ppo.max_new_tokens, cfg.ppo.rollout_batch, cfg.ppo.sample_every = 8, 8, 1
  cfg.train.num_steps, cfg.train.checkpoint_every = steps, 1
  return cfg


def pipeline(tmp_path_factory) -> dict[str, str]:
  """Task files, finished tiny pretrain, SFT (lr = 0) and RM workdirs, a JAX cache dir (built once a session: the
  first pytest-xdist worker builds them under a file lock, the others read its done.json).

  The RM (init_from the SFT workdir) trains RM_STEPS steps on the easy comparisons, is evaluated on the held-out
  ones (all 64 pairs) and normalised on the demonstrations (reward_offset.json).
  """
  import fcntl
  if "pipeline" in _CACHE:
    return _CACHE["pipeline"]
  base = tmp_path_factory.getbasetemp()
  root = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-pipeline")  # one a session
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = os.path.join(root, "done.json")
    if not os.path.exists(done):
      files = dict(task_files(root))
      files["pretrain"], files["sft"], files["rm"] = (os.path.join(root, d) for d in ("pretrain", "sft", "rm"))
      files["jax_cache"] = os.path.join(root, "jax_cache")  # persistent compilation cache shared by `run_main`
      stages.run_lm(pretrain_cfg(files), files["pretrain"], "pretrain")
      stages.run_lm(sft_cfg(files, files["pretrain"]), files["sft"], "sft")
      stages.run_reward(reward_cfg(files, files["sft"]), files["rm"])
      with open(done, "w") as f:
        json.dump(files, f)
    with open(done) as f:
      _CACHE["pipeline"] = json.load(f)
  return _CACHE["pipeline"]


def tiny_flags(**flags) -> dict:
  """`--config.` overrides giving a main the sizes of `tiny` (plus `flags`)."""
  out = {f"model.{k}": v for k, v in TINY_MODEL.items()}
  out.update({"tokenizer.vocab_size": VOCAB, "data.seq_len": 48, "data.batch_size": 8, "train.log_every": 1,
              "train.eval_every": 0, "train.eval_batches": 2, "opt.warmup_steps": 0})
  out.update(flags)
  return out


def run_main(stage: str, workdir: str, overrides: dict, cache_dir: str | None = None, timeout: int = 600):
  """`python -m experiments.<stage>` with `--config.<key>=<value>` overrides (4 fake devices, as in conftest).

  `cache_dir` turns on JAX's persistent compilation cache for the subprocess, so a re-run compiles nothing new.
  """
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = [sys.executable, "-m", f"experiments.{stage}", f"--config=experiments/configs/{stage}.py",
         f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def close_trees(a, b, atol: float) -> None:
  """Every leaf of `a` within `atol` of `b`'s (rtol 0); a mismatch names the leaf's path."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def assert_update_matches(four: dict, one: dict) -> tuple[dict, dict]:
  """A 4-device PPO score + update equals the 1-device one (rollout, params, every metric within 1e-5) and moved
  the params; returns the 1-device (score, update) metrics for further checks."""
  close_trees(four["rollout"], one["rollout"], 1e-5)
  close_trees(four["params"], one["params"], 1e-5)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one["params"]),
                                                            jax.tree.leaves(one["start"])))
  assert moved > 1e-3  # the update did something
  m4, m1 = ppo._host_metrics(four["sums"]), ppo._host_metrics(one["sums"])
  u4, u1 = metrics.summarize(four["usums"]), metrics.summarize(one["usums"])
  for k in m1:
    assert abs(m4[k] - m1[k]) <= 1e-5 * max(1.0, abs(m1[k])), k
  for k in u1:
    assert abs(u4[k] - u1[k]) <= 1e-5 * max(1.0, abs(u1[k])), k
  return m1, u1
