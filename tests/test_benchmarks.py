"""benchmarks/accelerator.py runs end to end on CPU (tiny shapes) and prints its three measurements."""
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
