"""Fault injection: every stage in a subprocess, SIGKILLed at random points (or mid-checkpoint-write), resumed.

  python -m tests.faults_driver --kills=3 [--write_kills=1 --nans=1 --controls=1] [--multihost]
      [--stages=pretrain,sft,reward,ppo] [--seed=0] [--root=/tmp/faults] [--mesh=fsdp=2,tensor=2]

For each stage: one uninterrupted reference run; then, per kill point, the same command is started in a fresh
workdir, SIGKILLed (whole process group) at a random moment after its first finished checkpoint (or as soon as
a later checkpoint is being written), and started again until it finishes. The resumed run must say it resumed
from the last finished checkpoint, and its final checkpoint must equal the reference's bit for bit: every leaf
of the state (params, optimizer state, step, RNG) and the JSON extra (data position, PPO KL controller), plus
every metrics.jsonl row (timing fields aside). NaN cases run with --config.train.nan_at_step: the run must stop
naming the step, before saving a poisoned checkpoint, and the same command without the flag must resume exactly.
Negative controls corrupt the saved data position (PPO: KL coefficient) before resuming: the comparison must fail.
Each reference run is the next stage's `init_from` (pretrain -> SFT -> RM; PPO from SFT + RM); PPO runs with the
adaptive KL controller. --multihost adds 2-process diagnostics. tests/test_faults.py runs a few cases quickly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = dict(num_corpus_docs=400, num_demonstrations=200, num_rl_prompts=50, num_heldout_prompts=20)
TINY_MODEL = {"model.d_model": 32, "model.num_heads": 2, "model.num_kv_heads": 2, "model.d_ff": 64,
              "model.num_layers": 1, "model.max_len": 96}
STAGES = ("pretrain", "sft", "reward", "ppo")
TIMING_KEYS = ("generation_s", "update_s", "steps_per_s", "tokens_per_s")  # metrics that may differ between runs
RESUMED = re.compile(r"resumed (?:from \S+ )?at (?:step|iteration) (\d+)")
STEPS = {"pretrain": 60, "sft": 40, "reward": 40, "ppo": 10}  # default lengths: ~1 s of training each
EVERY = {"pretrain": 10, "sft": 8, "reward": 8, "ppo": 2}  # checkpoint_every


# ------------------------------------------------------------------------------------------- inputs


def stage_env(devices: int = 4) -> dict[str, str]:
  """The environment of every stage subprocess: CPU with `devices` fake devices, the repo importable."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
             TF_CPP_MIN_LOG_LEVEL="2")
  return env


def task_files(root: str) -> dict[str, str]:
  """The embedded task's files (TASK sizes) plus ranked comparisons (4 candidates per demonstration prompt)."""
  from rlhf_jax import rankings, tasks
  cfg = tasks.TaskConfig(**TASK)
  files = tasks.generate_all(cfg, os.path.join(root, "task"))
  with open(files["demonstrations"]) as f:
    prompts = [json.loads(line)["prompt"] for line in f][:120]
  fillers = ("yes.", "the old dog ran.", "note: red boat")
  candidates = [[tasks.reference_answer(p), tasks.reference_answer(p)[::-1] + " 7", *fillers[:2]] for p in prompts]
  records = rankings.make_comparisons(prompts, candidates, cfg)
  files["comparisons"] = tasks.write_comparisons(os.path.join(root, "task", "comparisons.jsonl"), records)
  return files


def stage_overrides(stage: str, files: dict[str, str], sources: dict[str, str], steps: int, every: int) -> dict:
  """The `--config.*` overrides of `stage` (tiny model, log every step); `sources` holds earlier stages' workdirs."""
  o = {"train.num_steps": steps, "train.checkpoint_every": every, "train.log_every": 1, "train.keep_checkpoints": 2}
  if stage == "pretrain":
    o.update({"data.train": files["corpus"], "data.seq_len": 64, "data.batch_size": 8, **TINY_MODEL})
    o.update({"tokenizer.path": files["tokenizer"]} if "tokenizer" in files else {"tokenizer.vocab_size": 400})
  elif stage == "sft":
    o.update({"data.train": files["demonstrations"], "data.seq_len": 64, "data.batch_size": 8,
              "train.init_from": sources["pretrain"]})
  elif stage == "reward":
    o.update({"data.train": files["comparisons"], "data.seq_len": 48, "data.batch_size": 8,
              "data.max_responses": 4, "train.init_from": sources["sft"]})
  elif stage == "ppo":
    o.update({"train.init_from": sources["sft"], "ppo.reward_from": sources["reward"],
              "data.prompts": files["rl_prompts"], "data.ptx": files["corpus"], "data.prompt_len": 24,
              "data.ptx_seq_len": 32, "data.ptx_batch_size": 8, "ppo.rollout_batch": 8, "ppo.max_new_tokens": 8,
              "ppo.sample_every": 0, "ppo.adaptive_kl": True, "ppo.kl_target": 0.05, "ppo.kl_horizon": 50,
              "opt.lr": 1e-3})
  else:
    raise ValueError(f"stage={stage!r}; expected one of {STAGES}")
  return o


def command(stage: str, workdir: str, overrides: dict, flags: Sequence[str] = ()) -> list[str]:
  """`python -m experiments.<stage> --config=... --workdir=... --config.<key>=<value>... <flags>`."""
  cmd = [sys.executable, "-m", f"experiments.{stage}", f"--config=experiments/configs/{stage}.py",
         f"--workdir={workdir}"]
  return cmd + [f"--config.{k}={v}" for k, v in overrides.items()] + list(flags)


def stage_command(stage: str, workdir: str, files: dict[str, str], sources: dict[str, str], steps: int,
                  every: int, **extra) -> list[str]:
  """The command line of `stage` (see stage_overrides), with `extra` overrides (e.g. train__nan_at_step=5)."""
  o = stage_overrides(stage, files, sources, steps, every)
  o.update({k.replace("__", "."): v for k, v in extra.items()})
  return command(stage, workdir, o)


# ------------------------------------------------------------------------------------------- processes


@dataclasses.dataclass
class Outcome:
  """How one subprocess ended: return code, its output, and (for killed runs) where the kill landed."""
  returncode: int
  log: str
  killed: bool = False
  kill_step: int = -1  # last metrics.jsonl step before the kill
  finished_at_kill: tuple = ()  # finished checkpoint steps when the kill landed
  tmp_at_kill: tuple = ()  # orbax temporary (unfinished) checkpoint dirs when the kill landed

  def tail(self, n: int = 3000) -> str:
    return self.log[-n:]


def finished_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps in workdir/checkpoints (orbax renames `N.orbax-checkpoint-tmp-*` to `N`)."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def tmp_checkpoints(workdir: str) -> list[str]:
  """Unfinished (temporary) orbax checkpoint dirs in workdir/checkpoints."""
  try:
    return sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints")) if ".orbax-checkpoint-tmp" in n)
  except FileNotFoundError:
    return []


def last_metrics_step(workdir: str) -> int:
  """Step of the last complete metrics.jsonl row (-1 when none)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
      f.seek(max(0, os.path.getsize(f.name) - 4096))
      lines = f.read().split(b"\n")
  except FileNotFoundError:
    return -1
  for line in reversed(lines[:-1]):  # the text after the last newline may be a partial row
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError):
      continue
  return -1


def _start(cmd: Sequence[str], env: dict, log_path: str) -> tuple[subprocess.Popen, Any]:
  log = open(log_path, "w")
  proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
  return proc, log


def _kill_group(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()


class Background:
  """A subprocess in its own process group (so a kill takes its children too), output to `log_path`."""

  def __init__(self, cmd: Sequence[str], env: dict, log_path: str):
    self.cmd, self.log_path = list(cmd), log_path
    self.proc, self._log = _start(cmd, env, log_path)

  def kill(self) -> None:
    """SIGKILLs the process group and waits for it."""
    _kill_group(self.proc)

  def outcome(self, **fields) -> Outcome:
    """The outcome of the ended process."""
    self._log.close()
    with open(self.log_path) as f:
      return Outcome(self.proc.returncode, f.read(), **fields)

  def wait(self, timeout: float = 300) -> Outcome:
    """Waits for the end; TimeoutError (after killing the group) past `timeout` seconds."""
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      self._log.close()
      raise TimeoutError(f"{' '.join(self.cmd)} ran over {timeout}s; log {self.log_path}") from None
    return self.outcome()


def run(cmd: Sequence[str], env: dict, log_path: str, timeout: float = 300) -> Outcome:
  """Runs `cmd` to completion (its process group killed after `timeout` seconds)."""
  return Background(cmd, env, log_path).wait(timeout)


def run_processes(cmds: Sequence[Sequence[str]], env: dict, log_prefix: str, timeout: float = 300,
                  grace: float = 10.0) -> list[Outcome]:
  """Runs the processes of one multi-process job; when one fails the rest are killed `grace` seconds later.

  A failed peer otherwise leaves the others blocked in a collective until the coordination timeout.
  """
  procs = [Background(c, env, f"{log_prefix}.p{i}.log") for i, c in enumerate(cmds)]
  deadline, kill_at = time.monotonic() + timeout, None
  try:
    while any(p.proc.poll() is None for p in procs):
      now = time.monotonic()
      if kill_at is None and any(p.proc.poll() not in (None, 0) for p in procs):
        kill_at = now + grace
      if now > deadline or (kill_at is not None and now > kill_at):
        break
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.proc.poll() is None:
        p.kill()
  outs = [p.outcome() for p in procs]
  if time.monotonic() > deadline:
    raise TimeoutError(f"{log_prefix}: processes ran over {timeout}s; exit codes {[o.returncode for o in outs]}; "
                       f"logs {log_prefix}.p*.log")
  return outs


def free_port() -> int:
  """A free TCP port on the loopback interface (for the multi-host coordinator)."""
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def multihost_commands(stage: str, workdir: str, overrides: dict, num_processes: int, port: int) -> list[list[str]]:
  """One command per process of a multi-process job coordinated on 127.0.0.1:`port`."""
  return [command(stage, workdir, overrides, [f"--coordinator_address=127.0.0.1:{port}",
                                              f"--num_processes={num_processes}", f"--process_id={i}"])
          for i in range(num_processes)]


def run_and_kill(cmd: Sequence[str], env: dict, workdir: str, log_path: str, rng: np.random.Generator,
                 num_steps: int, mode: str = "random", timeout: float = 300) -> Outcome:
  """Starts `cmd` and SIGKILLs its process group after its first finished checkpoint.

  mode "random": once the metrics reach a step drawn uniformly from (first checkpoint, num_steps - 2], plus a
  random 0-20 ms; mode "write": while a later checkpoint is being written (the group is SIGSTOPped as soon as an
  orbax tmp dir appears and SIGKILLed if it is still there, else resumed until the next one).
  The outcome says where the kill landed; `killed` is False when the run ended first.
  """
  if mode not in ("random", "write"):
    raise ValueError(f"mode={mode!r}; expected 'random' or 'write'")
  job = Background(cmd, env, log_path)
  deadline, target, jitter = time.monotonic() + timeout, None, float(rng.uniform(0.0, 0.02))
  while job.proc.poll() is None:
    if time.monotonic() > deadline:
      job.kill()
      raise TimeoutError(f"{' '.join(cmd)} ran over {timeout}s; log {log_path}")
    done = finished_steps(workdir)
    if done and target is None:
      target = int(rng.integers(done[0] + 1, max(done[0] + 2, num_steps - 1)))
    if mode == "write" and done and tmp_checkpoints(workdir):
      os.killpg(job.proc.pid, signal.SIGSTOP)  # frozen first, so the write cannot finish between check and kill
      if not tmp_checkpoints(workdir):  # the rename won the race: let it go on to the next checkpoint
        os.killpg(job.proc.pid, signal.SIGCONT)
        continue
      fire = True
    else:
      fire = mode == "random" and target is not None and last_metrics_step(workdir) >= target
    if fire:
      if mode == "random":
        time.sleep(jitter)
      job.kill()
      return job.outcome(killed=True, kill_step=last_metrics_step(workdir),
                         finished_at_kill=tuple(finished_steps(workdir)), tmp_at_kill=tuple(tmp_checkpoints(workdir)))
    time.sleep(0.001 if mode == "write" else 0.003)
  return job.outcome()


# ------------------------------------------------------------------------------------------- comparison


def final_checkpoint(workdir: str) -> tuple[int, Any, dict]:
  """(step, state tree of numpy arrays, extra JSON) of the latest finished checkpoint in `workdir`."""
  import jax
  import orbax.checkpoint as ocp
  from rlhf_jax import checkpoint
  ckpt = checkpoint.Checkpointer(workdir, create=False)
  step = ckpt.latest_step()
  if step is None:
    ckpt.close()
    raise AssertionError(f"{workdir}: no finished checkpoint")
  out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(ckpt.host_target(step)),
                                                           extra=ocp.args.JsonRestore()))
  ckpt.close()
  return step, jax.tree.map(np.asarray, out["state"]), out["extra"]


def metric_rows(workdir: str) -> list[dict]:
  """metrics.jsonl rows without the timing fields."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_run(ref_workdir: str, workdir: str) -> int:
  """AssertionError unless both final checkpoints match bit for bit and the metric rows are equal; leaf count."""
  import jax
  ref_step, ref_state, ref_extra = final_checkpoint(ref_workdir)
  step, state, extra = final_checkpoint(workdir)
  assert step == ref_step, f"final step {step} != reference {ref_step}"
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(ref_state)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  assert treedef == ref_def, f"state structure differs:\n{treedef}\nvs reference\n{ref_def}"
  for (path, a), (_, b) in zip(leaves, ref_leaves):
    assert a.dtype == b.dtype, f"{jax.tree_util.keystr(path)}: dtype {a.dtype} != {b.dtype}"
    np.testing.assert_array_equal(a, b, err_msg=f"state{jax.tree_util.keystr(path)} differs from the reference")
  assert extra == ref_extra, f"checkpoint extra differs:\n{extra}\nvs reference\n{ref_extra}"
  rows, ref_rows = metric_rows(workdir), metric_rows(ref_workdir)
  assert [r["step"] for r in rows] == [r["step"] for r in ref_rows], "metrics.jsonl steps differ"
  for r, q in zip(rows, ref_rows):
    assert r == q, f"metrics row differs from the reference:\n{r}\nvs\n{q}"
  return len(leaves)


def resumed_step(log: str) -> int | None:
  """The step/iteration a run's log says it resumed from (None: started fresh)."""
  m = RESUMED.search(log)
  return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------- sweep


@dataclasses.dataclass
class Point:
  """One fault case's record for the report."""
  stage: str
  seed: int
  mode: str  # random | write (SIGKILL) | nan (--config.train.nan_at_step) | control (tampered restore)
  kill_step: int = -1  # last logged step before the kill (nan: the poisoned step)
  resumed_from: int | None = None
  tmp_at_kill: tuple = ()
  status: str = "?"  # pass | FAIL | missed; control: detected | UNDETECTED
  detail: str = ""


def _resume_and_compare(point: Point, ref: str, workdir: str, cmd: Sequence[str], env: dict, expect_from: int,
                        timeout: float) -> Point:
  """Reruns `cmd` to the end; pass iff it resumed from `expect_from` and matches the reference bit for bit."""
  res = run(cmd, env, workdir + ".resumed.log", timeout)
  point.resumed_from = resumed_step(res.log)
  if res.returncode != 0:
    point.status, point.detail = "FAIL", f"resume exited {res.returncode}: {res.tail(1500)}"
  elif point.resumed_from != expect_from:
    point.status, point.detail = "FAIL", f"resumed from {point.resumed_from}, expected {expect_from}"
  else:
    try:
      point.status, point.detail = "pass", f"{assert_same_run(ref, workdir)} state leaves bit-identical"
    except AssertionError as e:
      point.status, point.detail = "FAIL", " ".join(str(e).split())[:1500]
  return point


def kill_point(stage: str, ref: str, workdir: str, cmd: Sequence[str], env: dict, seed: int, num_steps: int,
               mode: str = "random", timeout: float = 300) -> Point:
  """SIGKILL one run of `cmd` (see run_and_kill), resume it, compare with `ref`; never raises on a mismatch."""
  point = Point(stage, seed, mode)
  out = run_and_kill(cmd, env, workdir, workdir + ".killed.log", np.random.default_rng(seed), num_steps, mode,
                     timeout)
  point.kill_step, point.tmp_at_kill = out.kill_step, out.tmp_at_kill
  if not out.killed:
    point.status, point.detail = "missed", f"ended (rc {out.returncode}) before the kill"
  elif not out.finished_at_kill or out.finished_at_kill[-1] >= num_steps:
    point.status, point.detail = "missed", f"killed with checkpoints {out.finished_at_kill}"
  else:
    _resume_and_compare(point, ref, workdir, cmd, env, out.finished_at_kill[-1], timeout)
  return point


def nan_point(stage: str, ref: str, workdir: str, cmd_fn, env: dict, nan_step: int, every: int,
              timeout: float = 300) -> Point:
  """Run with train.nan_at_step: must exit non-zero naming the step, keep the last good checkpoint, resume exactly."""
  point = Point(stage, nan_step, "nan", kill_step=nan_step)
  out = run(cmd_fn(workdir, train__nan_at_step=nan_step), env, workdir + ".nan.log", timeout)
  good = (nan_step - 1) // every * every
  done = finished_steps(workdir)
  if out.returncode == 0 or f"at step {nan_step};" not in out.log or "non-finite" not in out.log:
    point.status, point.detail = "FAIL", f"nan run exited {out.returncode}: {out.tail(1500)}"
  elif not done or done[-1] != good:
    point.status, point.detail = "FAIL", f"checkpoints after the NaN stop: {done}; expected the last to be {good}"
  else:
    _, state, _ = final_checkpoint(workdir)
    import jax
    if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating)):
      point.status, point.detail = "FAIL", f"checkpoint {good} holds non-finite values"
    else:
      _resume_and_compare(point, ref, workdir, cmd_fn(workdir), env, good, timeout)
  return point


def tamper_extra(workdir: str, step: int, fn) -> None:
  """Rewrites the JSON `extra` of checkpoint `step` in place with `fn(extra) -> extra` (negative controls)."""
  path = os.path.join(workdir, "checkpoints", str(step), "extra", "metadata")
  with open(path) as f:
    extra = json.load(f)
  with open(path, "w") as f:
    json.dump(fn(extra), f)


def control_point(stage: str, ref: str, workdir: str, cmd: Sequence[str], env: dict, seed: int, num_steps: int,
                  timeout: float = 300) -> Point:
  """Negative control: kill, corrupt what the restore must restore (data position; PPO: KL coefficient), resume.

  The comparison must then fail ("detected"); "UNDETECTED" means the harness cannot see a broken restore.
  """
  point = Point(stage, seed, "control")
  out = run_and_kill(cmd, env, workdir, workdir + ".killed.log", np.random.default_rng(seed), num_steps, "random",
                     timeout)
  point.kill_step = out.kill_step
  if not out.killed or not out.finished_at_kill or out.finished_at_kill[-1] >= num_steps:
    point.status, point.detail = "missed", f"rc {out.returncode}, checkpoints {out.finished_at_kill}"
    return point

  def corrupt(extra):
    if stage == "ppo":
      extra["data"]["kl"]["value"] *= 2.0
      point.detail = "KL coefficient doubled in the checkpoint"
    else:
      extra["data"]["position"] += 1
      point.detail = "data position + 1 in the checkpoint"
    return extra

  tamper_extra(workdir, out.finished_at_kill[-1], corrupt)
  detail = point.detail
  _resume_and_compare(point, ref, workdir, cmd, env, out.finished_at_kill[-1], timeout)
  point.status = {"FAIL": "detected", "pass": "UNDETECTED"}[point.status]
  point.detail = f"{detail}: {point.detail[:300]}"
  return point


def sweep(root: str, stages: Sequence[str], kills: int, seed: int, write_kills: int = 1, nans: int = 1,
          controls: int = 1, mesh: dict | None = None) -> list[Point]:
  """Reference runs of every stage (each the next one's source), then the fault cases of the chosen stages;
  `mesh` ({"fsdp": 2, ...}) lays every run out on that device mesh (--config.mesh.*)."""
  mesh_kw = {f"mesh__{k}": v for k, v in (mesh or {}).items()}
  env = stage_env()
  files = task_files(root)
  sources: dict[str, str] = {}
  points = []
  for stage in STAGES:
    if not any(STAGES.index(s) >= STAGES.index(stage) for s in stages):
      continue
    steps, every = STEPS[stage], EVERY[stage]
    cmd_fn = lambda w, stage=stage, **kw: stage_command(stage, w, files, sources, STEPS[stage], EVERY[stage],
                                                        **mesh_kw, **kw)
    ref = os.path.join(root, f"ref-{stage}")
    t0 = time.perf_counter()
    out = run(cmd_fn(ref), env, ref + ".log")
    if out.returncode != 0:
      raise RuntimeError(f"reference {stage} run failed (rc {out.returncode}):\n{out.tail()}")
    print(f"[{stage}] reference: {steps} steps, checkpoint every {every} ({time.perf_counter() - t0:.0f}s)",
          flush=True)
    if stage == "pretrain":
      files["tokenizer"] = os.path.join(ref, "tokenizer.model")  # later runs reuse it (sentencepiece is slow)
    sources[stage] = ref
    if stage not in stages:
      continue
    rng = np.random.default_rng([seed, STAGES.index(stage)])
    cases = ["random"] * kills + ["write"] * write_kills + ["nan"] * nans + ["control"] * controls
    for k, mode in enumerate(cases):
      point_seed = seed * 1000 + STAGES.index(stage) * 100 + k
      workdir = os.path.join(root, f"{stage}-{mode}-{point_seed}")
      t0 = time.perf_counter()
      if mode == "nan":
        p = nan_point(stage, ref, workdir, cmd_fn, env, int(rng.integers(every + 1, steps)), every)
      elif mode == "control":
        p = control_point(stage, ref, workdir, cmd_fn(workdir), env, point_seed, steps)
      else:
        p = kill_point(stage, ref, workdir, cmd_fn(workdir), env, point_seed, steps, mode)
      print(f"[{stage}] {mode:7s} seed {p.seed}: stopped after step {p.kill_step} (unfinished checkpoint dirs "
            f"{list(p.tmp_at_kill)}), resumed from {p.resumed_from}: {p.status} {p.detail} "
            f"({time.perf_counter() - t0:.0f}s)", flush=True)
      points.append(p)
  return points


def multihost(root: str) -> list[str]:
  """Real corpus, 2 processes x 2 devices: trajectory vs 1 x 4, whose loader state is saved, kill + resume.

  Returns report lines. Process 1 of a killed job is killed with process 0 (a lost host ends the job).
  """
  from rlhf_jax import data, tokenizer
  files = task_files(root)
  spm = os.path.join(REPO, "tests", "testdata", "spm", "spm.model")
  steps = 12
  o = {"data.train": files["corpus"], "data.seq_len": 32, "data.batch_size": 8, "tokenizer.path": spm,
       "train.num_steps": steps, "train.checkpoint_every": 4, "train.log_every": 1, **TINY_MODEL}
  w1, w2, wk = (os.path.join(root, f"mh-{n}") for n in ("1x4", "2x2", "2x2-killed"))
  for w in (w2, wk):
    os.makedirs(os.path.join(w, "checkpoints"), exist_ok=True)  # see test_a_late_host_on_a_fresh_workdir...
  lines = []
  one = Background(command("pretrain", w1, o), stage_env(4), w1 + ".log")
  outs = run_processes(multihost_commands("pretrain", w2, o, 2, free_port()), stage_env(2), w2)
  if one.wait().returncode or any(x.returncode for x in outs):
    return [f"multihost runs failed: see {w1}.log, {w2}.p*.log"]
  l1 = np.array([r["train_loss"] for r in metric_rows(w1)])
  l2 = np.array([r["train_loss"] for r in metric_rows(w2)])
  lines.append(f"real corpus, train_loss per step, 1x4: {np.round(l1, 4).tolist()}")
  lines.append(f"real corpus, train_loss per step, 2x2: {np.round(l2, 4).tolist()}")
  lines.append(f"max relative train_loss difference 2x2 vs 1x4: {np.max(np.abs(l2 - l1) / np.abs(l1)):.3g}")
  tok = tokenizer.load_tokenizer(spm)
  hosts = [data.make_lm_loader(files["corpus"], tok, 32, 8, 0, os.path.join(root, "mh-data"), process_index=i,
                               process_count=2, local_device_count=2) for i in range(2)]
  for h in hosts:
    for _ in range(steps):
      next(h)
  saved = final_checkpoint(w2)[2]["data"]
  lines.append(f"loader state saved by the 2x2 run: {saved}; host 0 after {steps} batches: {hosts[0].get_state()}; "
               f"host 1: {hosts[1].get_state()}")
  # SIGKILL both processes after a finished checkpoint, restart both, compare with the uninterrupted 2x2 run
  jobs = [Background(c, stage_env(2), f"{wk}.p{i}.killed.log")
          for i, c in enumerate(multihost_commands("pretrain", wk, o, 2, free_port()))]
  deadline = time.monotonic() + 300
  while jobs[0].proc.poll() is None and time.monotonic() < deadline and last_metrics_step(wk) < 6:
    time.sleep(0.003)
  for j in jobs:
    j.kill()
    j.outcome()
  killed_at, done = last_metrics_step(wk), finished_steps(wk)
  outs = run_processes(multihost_commands("pretrain", wk, o, 2, free_port()), stage_env(2), wk + ".resumed")
  if any(x.returncode for x in outs):
    errors = [(i, [l for l in x.log.splitlines() if "Error" in l][-1:]) for i, x in enumerate(outs) if x.returncode]
    lines.append(f"2x2 SIGKILL after step {killed_at} (checkpoints {done}); the restart FAILED, resuming from "
                 f"{resumed_step(outs[0].log)}: " + "; ".join(f"process {i}: {e}" for i, e in errors))
    return lines
  try:
    assert_same_run(w2, wk)
    verdict = "bit-identical to the uninterrupted 2x2 run"
  except AssertionError as e:
    verdict = "DIFFERS from the uninterrupted 2x2 run: " + str(e).splitlines()[0][:200]
  lines.append(f"2x2 SIGKILL after step {killed_at} (checkpoints {done}), resumed from "
               f"{resumed_step(outs[0].log)}: {verdict}")
  return lines


def main(argv: Sequence[str]) -> int:
  import argparse
  import tempfile
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=3, help="random SIGKILL points per stage")
  parser.add_argument("--write_kills", type=int, default=1, help="SIGKILLs during a checkpoint write per stage")
  parser.add_argument("--nans", type=int, default=1, help="runs stopped by train.nan_at_step per stage")
  parser.add_argument("--controls", type=int, default=1, help="negative controls (tampered restore) per stage")
  parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
  parser.add_argument("--seed", type=int, default=0, help="base seed of the kill points (printed per point)")
  parser.add_argument("--multihost", action="store_true", help="also the 2-process diagnostics (real corpus)")
  parser.add_argument("--root", default="", help="work directory (default: a new temporary directory)")
  parser.add_argument("--mesh", default="", help="device mesh of every run, e.g. fsdp=2,tensor=2 (default: data)")
  args = parser.parse_args(argv)
  mesh = {k: int(v) for k, v in (item.split("=") for item in args.mesh.split(",") if item)}
  stages = [s for s in args.stages.split(",") if s]
  bad = sorted(set(stages) - set(STAGES))
  if bad:
    parser.error(f"--stages: unknown {bad}; expected some of {STAGES}")
  root = args.root or tempfile.mkdtemp(prefix="faults-")
  os.makedirs(root, exist_ok=True)
  print(f"fault sweep in {root}", flush=True)
  t0 = time.perf_counter()
  points = sweep(root, stages, args.kills, args.seed, args.write_kills, args.nans, args.controls, mesh)
  print("\n| stage | case | seed / NaN step | stopped after step | unfinished ckpt dirs | resumed from | result |")
  print("|---|---|---|---|---|---|---|")
  for p in points:
    print(f"| {p.stage} | {p.mode} | {p.seed} | {p.kill_step} | {len(p.tmp_at_kill)} | {p.resumed_from} | "
          f"{p.status} |")
  count = lambda *modes: sum(p.mode in modes for p in points)
  passed = lambda *modes: sum(p.mode in modes and p.status == "pass" for p in points)
  print(f"\nSIGKILL points: {count('random', 'write')} tried, {passed('random', 'write')} passed, "
        f"{sum(p.status == 'missed' for p in points)} missed (run ended first); "
        f"{sum(bool(p.tmp_at_kill) for p in points)} of them landed while a checkpoint was being written; "
        f"NaN stops: {count('nan')} tried, {passed('nan')} passed; negative controls: "
        f"{sum(p.status == 'detected' for p in points)}/{count('control')} detected "
        f"({time.perf_counter() - t0:.0f}s)")
  if args.multihost:
    print("\nmulti-host (2 processes x 2 CPU devices, gloo on 127.0.0.1):")
    for line in multihost(os.path.join(root, "multihost")):
      print("  " + line, flush=True)
  bad_points = [p for p in points if p.status in ("FAIL", "UNDETECTED")]
  return 1 if bad_points else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
