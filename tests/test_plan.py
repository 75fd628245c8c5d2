"""The memory planner: the CLI on the tiny preset (a subprocess with its own simulated devices), FSDP's per-device
arguments below replication's, the fits / does-not-fit verdict, and bad input named before anything compiles."""
import os
import re
import subprocess
import sys

import pytest

from rlhf_jax import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK = re.compile(r"^peak per device: (\d+\.\d\d) GiB of ([\d.e+-]+) GiB \((fits|does not fit)\)$")


def _arguments_mib(lines, name):
  return float(re.search(rf"{name} +per device: arguments +([\d.]+) MiB", "\n".join(lines)).group(1))


def test_plan_cli_on_the_tiny_preset():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-m", "experiments.plan", "--stage=pretrain", "--model=tiny", "--devices=8",
                        "--device_memory_gib=16", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                        "--config.mesh.tensor=2", "--config.data.batch_size=8", "--config.data.seq_len=32"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in lines[0]
  assert [l.split()[0] for l in lines[1:-1]] == ["train_step", "eval_step"]
  assert PEAK.match(lines[-1]).group(3) == "fits", lines[-1]


def test_fsdp_holds_a_fraction_of_the_replicated_state_and_the_verdict_follows_the_budget():
  cfg = plan.stage_config("pretrain")
  cfg.data.batch_size, cfg.data.seq_len = 8, 32
  replicated = plan.run("pretrain", "tiny", 4, 1.0, cfg)
  cfg.mesh.fsdp = 4
  sharded = plan.run("pretrain", "tiny", 4, 1e-6, cfg)
  # the state (params + 2 Adam moments) dominates the arguments: 1/4 of it per device, plus the batch
  assert _arguments_mib(sharded, "train_step") < 0.4 * _arguments_mib(replicated, "train_step")
  assert PEAK.match(replicated[-1]).group(3) == "fits" and PEAK.match(sharded[-1]).group(3) == "does not fit"


@pytest.mark.parametrize("kw,match", [
    (dict(spec="gpt5"), "--model='gpt5'"), (dict(spec="hf:/nonexistent"), "config.json does not exist"),
    (dict(fsdp=3), "mesh data=1 x fsdp=3 x tensor=1 must multiply to --devices=4"),
    (dict(stage="reward"), "--stage='reward'")])
def test_bad_input_is_named(kw, match):
  with pytest.raises(ValueError, match=re.escape(match)):
    stage = kw.get("stage", "pretrain")
    cfg = plan.stage_config(stage)
    cfg.mesh.fsdp = kw.get("fsdp", 1)
    if kw.get("fsdp") == 3:
      cfg.mesh.data = 1
    plan.run(stage, kw.get("spec", "tiny"), 4, 1.0, cfg)
