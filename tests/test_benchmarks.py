"""benchmarks/accelerator.py runs end to end on CPU (tiny shapes) and prints its three measurements;
benchmarks/plan_table.py plans the tiny preset and prints its rows."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_benchmark_runs_tiny_on_cpu():
  env = dict(os.environ, JAX_PLATFORMS="cpu", BENCH_THREADS="1")
  env.pop("XLA_FLAGS", None)  # one plain CPU device, not the suite's fake devices
  out = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--steps", "2"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "(tiny shapes)" in text
  mfu = re.search(r"pretraining: .* ([\d.]+) tokens/s, .* MFU ([\d.]+)%", text)
  assert mfu and float(mfu.group(1)) > 0 and 0 < float(mfu.group(2)) < 100, text
  assert float(re.search(r"sampler: .*: (\d+) sampled tokens/s", text).group(1)) > 0, text
  split = re.search(r"generation ([\d.]+) s \((\d+)%\), scoring ([\d.]+) s \((\d+)%\), update ([\d.]+) s \((\d+)%\)",
                    text)
  assert split and 98 <= sum(int(split.group(i)) for i in (2, 4, 6)) <= 102, text


def test_plan_table_tiny_rows_and_verdict():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # each planner subprocess sets its own device count
  out = subprocess.run([sys.executable, "-m", "benchmarks.plan_table", "--devices", "2", "--models", "tiny",
                        "--stages", "pretrain", "--lora_devices", "", "--memory", "0.0001"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = re.findall(r"^\| pretrain \| tiny \| 2 \| (\w+) \| ([\d.e-]+) \| (.*?) \| train_step \d+, eval_step \d+ \|$",
                    out.stdout, re.M)
  assert [r[0] for r in rows] == ["replicated", "fsdp"], out.stdout
  # 0.0001 GiB (107 KB) is below the tiny model's parameters + Adam moments (the planner prints 2 decimals: 0)
  assert all(fits == "**no**" for _, _, fits in rows), out.stdout
