"""The memory planner's table (BENCHMARKS.md, "Memory planner (issue 15)"): `experiments.plan` for pretraining and
PPO of GPT-2 124M and LLaMA-3-8B on 8 / 64 / 256 simulated devices in three layouts (replicated data=N, fsdp=N,
fsdp=N/8 x tensor=8), plus LLaMA-3-8B PPO with LoRA rank 16; prints one markdown row per configuration.

Each configuration runs in its own subprocess (the simulated device count is fixed when jax starts), under a
wall-clock limit; one that runs past it is reported as a timeout and its larger device counts are skipped.

Command: python -m benchmarks.plan_table [--devices 8,64,256] [--models gpt2-124m,llama3-8b] [--timeout 600]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run fields per model: 8B in bf16 with scanned, rematerialised blocks; both with jax.nn.dot_product_attention
# ("xla", what an accelerator runs without cudnn) rather than "auto", which on the CPU picks the CPU row path.
MODEL_FLAGS = {
    "gpt2-124m": ["--config.model.scan_layers=True", "--config.model.attention=xla"],
    "llama3-8b": ["--config.model.scan_layers=True", "--config.model.attention=xla", "--config.model.remat=block",
                  "--config.model.dtype=bfloat16", "--config.model.param_dtype=bfloat16"],
    "tiny": ["--config.model.attention=xla"],
}
SEQ = {"gpt2-124m": 1024, "llama3-8b": 2048, "tiny": 64}  # pretraining sequence length
PER_DEVICE = {"gpt2-124m": 8, "llama3-8b": 4, "tiny": 2}  # global batch = devices x this (pretrain and rollout)
PROMPT, NEW = {"tiny": 16}, {"tiny": 8}  # PPO prompt / response lengths, default 512 / 256


def layouts(n: int) -> dict[str, list[str]]:
  """The three meshes of n devices (fsdp x tensor only where 8 divides n)."""
  out = {"replicated": [f"--config.mesh.data={n}"], "fsdp": [f"--config.mesh.data=1", f"--config.mesh.fsdp={n}"]}
  if n % 8 == 0:
    out["fsdp×tensor"] = ["--config.mesh.data=1", f"--config.mesh.fsdp={n // 8}", "--config.mesh.tensor=8"]
  return out


def stage_flags(stage: str, model: str, n: int, lora: int) -> list[str]:
  """The stage's shape flags: global batch = n x PER_DEVICE[model]."""
  b = n * PER_DEVICE[model]
  if stage == "pretrain":
    return [f"--config.data.batch_size={b}", f"--config.data.seq_len={SEQ[model]}"]
  return [f"--config.ppo.rollout_batch={b}", f"--config.data.prompt_len={PROMPT.get(model, 512)}",
          f"--config.ppo.max_new_tokens={NEW.get(model, 256)}", "--config.ppo.ptx_coef=0.0",
          f"--config.lora.rank={lora}"]


def plan_one(stage: str, model: str, n: int, layout: list[str], lora: int, memory: float, timeout: float) -> dict:
  """Runs experiments.plan once; {peak, fits, compile: {fn: s}, wall} or {error}."""
  cmd = [sys.executable, "-m", "experiments.plan", f"--stage={stage}", f"--model={model}", f"--devices={n}",
         f"--device_memory_gib={memory:g}", *layout, *stage_flags(stage, model, n, lora), *MODEL_FLAGS[model]]
  t0 = time.perf_counter()
  try:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timeout > {timeout:.0f} s", "wall": time.perf_counter() - t0}
  wall = time.perf_counter() - t0
  peak = re.search(r"peak per device: ([\d.]+) GiB of [\d.]+ GiB \((fits|does not fit)\)", out.stdout)
  if out.returncode or not peak:
    lines = (out.stderr + out.stdout).strip().splitlines() or ["?"]
    last = next((l for l in reversed(lines) if re.match(r"\w*(Error|error)\b", l.strip())), lines[-1])
    return {"error": last.strip()[:160].replace("|", "/"), "wall": wall}
  comp = dict(re.findall(r"^\s+(\w+)\s+per device:.*compile ([\d.]+) s", out.stdout, re.M))
  return {"peak": float(peak.group(1)), "fits": peak.group(2) == "fits", "compile": comp, "wall": wall,
          "cmd": " ".join(cmd[1:])}


def configurations(devices: list[int], models: list[str], lora_devices: list[int]):
  """(stage, model, n, layout name, layout flags, lora rank), smallest device count first, the largest model and
  PPO first within one (so that a time-limited run keeps the rows that matter most)."""
  lora_model = "llama3-8b" if "llama3-8b" in models else models[-1]
  for n in devices:
    for model in reversed(models):
      for stage in ("ppo", "pretrain"):
        for lora in (0, 16) if stage == "ppo" and model == lora_model and n in lora_devices else (0,):
          for name, flags in layouts(n).items():
            yield stage, model, n, name, flags, lora


def row(stage, model, n, name, lora, r) -> str:
  what = f"{stage}" + (f" LoRA r={lora}" if lora else "")
  if "error" in r:
    return f"| {what} | {model} | {n} | {name} | – | {r['error']} | – |"
  comp = ", ".join(f"{k} {float(v):.0f}" for k, v in r["compile"].items())
  return f"| {what} | {model} | {n} | {name} | {r['peak']:.3g} | {'yes' if r['fits'] else '**no**'} | {comp} |"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", default="8,64,256")
  ap.add_argument("--models", default="gpt2-124m,llama3-8b")
  ap.add_argument("--stages", default="ppo,pretrain")
  ap.add_argument("--lora_devices", default="8,64", help="device counts of the LoRA rank-16 PPO rows")
  ap.add_argument("--memory", type=float, default=80.0, help="device memory, GiB")
  ap.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
  ap.add_argument("--jobs", type=int, default=1, help="configurations planned at once")
  ap.add_argument("--verbose", action="store_true", help="print each planner command")
  args = ap.parse_args()
  devices = [int(d) for d in args.devices.split(",")]
  lora_devices = [int(d) for d in args.lora_devices.split(",") if d]
  todo = [c for c in configurations(devices, args.models.split(","), lora_devices)
          if c[0] in args.stages.split(",")]
  print("| stage | model | devices | layout | peak GiB / device | fits in "
        f"{args.memory:g} GiB? | compile s per function |\n|---|---|---|---|---|---|---|", flush=True)
  timed_out = set()  # (stage, model, layout, lora) whose smaller device count timed out: larger ones are skipped

  def one(c):
    stage, model, n, name, flags, lora = c
    if (stage, model, name, lora) in timed_out:
      return {"error": "skipped (smaller device count timed out)"}
    r = plan_one(stage, model, n, flags, lora, args.memory, args.timeout)
    if r.get("error", "").startswith("timeout"):
      timed_out.add((stage, model, name, lora))
    return r

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for (stage, model, n, name, _, lora), r in zip(todo, pool.map(one, todo)):
      print(row(stage, model, n, name, lora, r), flush=True)
      if args.verbose and "cmd" in r:
        print(f"<!-- {r['cmd']} ({r['wall']:.0f} s) -->", flush=True)
  print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
  main()
