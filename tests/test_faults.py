"""Faults: SIGKILL mid-checkpoint-write or at a random step, NaN stops; resumed runs equal uninterrupted ones bitwise.

Every run is a real experiment subprocess (4 fake CPU devices), compared with an uninterrupted run of the same
command: every state leaf (params, optimizer state, step, RNG), the checkpoint's JSON extra (data position, KL
controller) and every metrics.jsonl row. The sweep over all stages and many kill points is `make faults`
(tests/faults_driver.py); these are its quick cases.
"""
import contextlib
import fcntl
import json
import os
import shutil

import jax
import numpy as np
import pytest

import faults_driver as fd  # tests/ is on sys.path under pytest
from rlhf_jax import checkpoint, stages
from rlhf_jax.model import TransformerConfig

STEPS, EVERY = 40, 10  # pretraining: checkpoints at 10, 20, 30, 40 (2 kept)
PPO_STEPS, PPO_EVERY = 6, 2


@contextlib.contextmanager
def _locked(path):
  """An exclusive file lock: pytest-xdist workers build the shared runs once."""
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _fake_reward_model(pretrain: str, workdir: str) -> None:
  """An RM workdir for PPO without a training run: the pretrained backbone + a fresh head, stage "reward"."""
  params, extra = checkpoint.load_params(pretrain)
  model = TransformerConfig.from_dict(extra["meta"]["model"])
  rm = stages.fresh_reward_params(model, jax.random.PRNGKey(0), backbone=params)
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(1, {"params": rm}, {"data": {}, "meta": {"stage": "reward", "model": extra["meta"]["model"]}})
  ckpt.close()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """Task files, an uninterrupted pretraining run (the reference; PPO's policy) and an RM workdir, built once."""
  base = tmp_path_factory.getbasetemp()
  root = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "faults-chain")  # one per session
  os.makedirs(root, exist_ok=True)
  ref, rm = os.path.join(root, "ref-pretrain"), os.path.join(root, "rm")
  env = fd.stage_env()
  with _locked(os.path.join(root, ".lock")):
    if not os.path.exists(os.path.join(root, "done.json")):
      files = fd.task_files(root)
      out = fd.run(fd.stage_command("pretrain", ref, files, {}, STEPS, EVERY), env, ref + ".log")
      assert out.returncode == 0, out.tail()
      files["tokenizer"] = os.path.join(ref, "tokenizer.model")
      _fake_reward_model(ref, rm)
      with open(os.path.join(root, "done.json"), "w") as f:
        json.dump(files, f)
    with open(os.path.join(root, "done.json")) as f:
      files = json.load(f)
  return {"root": root, "files": files, "env": env, "ref": ref,
          "sources": {"pretrain": ref, "sft": ref, "reward": rm}}


def test_sigkill_mid_checkpoint_write_then_nan_stop_then_resume_is_bit_identical(chain):
  env, workdir = chain["env"], os.path.join(chain["root"], "pretrain-faults")
  cmd = lambda **kw: fd.stage_command("pretrain", workdir, chain["files"], {}, STEPS, EVERY, **kw)
  # 1. SIGKILL while orbax writes a checkpoint after the first one
  out = fd.run_and_kill(cmd(), env, workdir, workdir + ".killed.log", np.random.default_rng(0), STEPS, mode="write")
  assert out.killed and out.returncode == -9, out.tail()
  assert out.tmp_at_kill, f"the kill missed the write window (finished {out.finished_at_kill})"
  good = out.finished_at_kill[-1]
  assert EVERY <= good < int(out.tmp_at_kill[-1].split(".")[0]) < STEPS + 1
  assert fd.tmp_checkpoints(workdir) == list(out.tmp_at_kill)  # the unfinished write is left behind ...
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  assert ckpt.latest_step() == good  # ... and ignored: the previous checkpoint is the latest
  ckpt.close()
  params, extra = checkpoint.load_params(workdir)
  assert extra["data"]["records"] == 400 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  # 2. the same command resumes from it; a NaN injected at a later checkpoint step stops it, naming the step
  nan_step = good + EVERY
  nan = fd.run(cmd(train__nan_at_step=nan_step), env, workdir + ".nan.log")
  assert fd.resumed_step(nan.log) == good, nan.tail()
  assert nan.returncode != 0
  assert "pretrain: non-finite" in nan.log and "loss=nan" in nan.log and f"at step {nan_step};" in nan.log, nan.tail()
  assert fd.finished_steps(workdir)[-1] == good  # the poisoned state was never saved
  # 3. without the flag the same command resumes again and ends exactly where the uninterrupted run did
  res = fd.run(cmd(), env, workdir + ".resumed.log")
  assert res.returncode == 0, res.tail()
  assert fd.resumed_step(res.log) == good
  fd.assert_same_run(chain["ref"], workdir)


def test_ppo_adaptive_kl_sigkill_at_random_step_resumes_bit_identical(chain):
  root, env = chain["root"], chain["env"]
  cmd = lambda w: fd.stage_command("ppo", w, chain["files"], chain["sources"], PPO_STEPS, PPO_EVERY)
  ref, workdir, control = (os.path.join(root, d) for d in ("ref-ppo", "ppo-kill", "ppo-control"))
  ref_job = fd.Background(cmd(ref), env, ref + ".log")  # the reference runs alongside the killed run
  try:
    out = fd.run_and_kill(cmd(workdir), env, workdir, workdir + ".killed.log", np.random.default_rng(1), PPO_STEPS)
  finally:
    ref_out = ref_job.wait()
  assert ref_out.returncode == 0, ref_out.tail()
  assert out.killed and out.returncode == -9, out.tail()
  good = out.finished_at_kill[-1]
  assert 0 < good < PPO_STEPS
  # negative control: a copy whose checkpoint has a wrong KL coefficient must end differently
  shutil.copytree(workdir, control)
  fd.tamper_extra(control, good, lambda e: {**e, "data": {**e["data"], "kl": {**e["data"]["kl"],
                                                                            "value": e["data"]["kl"]["value"] * 2}}})
  control_job = fd.Background(cmd(control), env, control + ".resumed.log")
  try:
    res = fd.run(cmd(workdir), env, workdir + ".resumed.log")
  finally:
    control_out = control_job.wait()
  assert res.returncode == 0, res.tail()
  assert fd.resumed_step(res.log) == good
  fd.assert_same_run(ref, workdir)
  coefs = [r["kl_coef"] for r in fd.metric_rows(ref)]
  assert len(set(coefs)) == PPO_STEPS, coefs  # the adaptive coefficient moved every iteration
  assert control_out.returncode == 0 and fd.resumed_step(control_out.log) == good, control_out.tail()
  with pytest.raises(AssertionError, match="differs"):
    fd.assert_same_run(ref, control)
