"""Scaling of the pretraining step: ours (trainer.train_step on the data-parallel mesh) and PyTorch eager (HF GPT2LMHeadModel, same
weights) vs model size (D/L = 128/4, 256/6, 384/8 at T=256) and vs sequence length (T = 128, 256, 512 at
D=256 L=6), 4096 tokens per step (batch = 4096 / T), vocab 8192. Prints a markdown table (step time, tokens/s,
achieved FLOP/s, ours / eager) and writes benchmarks/scaling.png.

Command: .venv-bench/bin/python -m benchmarks.scaling [--reps 3] [--out benchmarks/scaling.png]
"""
from __future__ import annotations

import argparse
import os

from benchmarks import common

import jax  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.pretrain_step import lm_batch, ours_step, torch_step  # noqa: E402
from rlhf_jax import model  # noqa: E402

TOKENS = 4096
SIZES = ((128, 4), (256, 6), (384, 8))  # (D, L) at T = 256
LENGTHS = (128, 256, 512)  # T at D = 256, L = 6


def measure(d_model: int, layers: int, seq: int, reps: int) -> dict:
  """Median step seconds of ours and torch eager for one shape, interleaved."""
  cfg = common.gpt2_config(d_model=d_model, layers=layers, max_len=seq)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  batch = lm_batch(cfg, TOKENS // seq, seq)
  ours, compile_s = ours_step(cfg, params, batch)
  eager, _ = torch_step(common.hf_copy(cfg, params), batch)
  times, cpu = common.interleaved({"ours": ours, "eager": eager}, reps)
  row = dict(D=d_model, L=layers, T=seq, params=model.param_count(params), compile=compile_s,
             ours=common.med(times["ours"]), eager=common.med(times["eager"]), ours_cpu=common.med(cpu["ours"]),
             eager_cpu=common.med(cpu["eager"]),
             flops=common.train_flops(cfg, TOKENS // seq, seq), load=os.getloadavg()[0])
  print(f"  D={d_model} L={layers} T={seq}: ours {common.spread(times['ours'])}, eager {common.spread(times['eager'])}"
        f", load {row['load']:.1f}", flush=True)
  return row


def table(rows: list[dict]) -> str:
  """Markdown table of the measured rows."""
  lines = ["| D | L | T | batch | params | ours step s | ours tokens/s | ours GFLOP/s | eager step s | ours/eager "
           "| ours/eager CPU s | compile s | load |", "|" + "---|" * 13]
  for r in rows:
    lines.append(f"| {r['D']} | {r['L']} | {r['T']} | {TOKENS // r['T']} | {r['params'] / 1e6:.1f} M | {r['ours']:.2f} "
                 f"| {TOKENS / r['ours']:.0f} | {r['flops'] / r['ours'] / 1e9:.1f} | {r['eager']:.2f} "
                 f"| {r['ours'] / r['eager']:.2f} | {r['ours_cpu'] / r['eager_cpu']:.2f} | {r['compile']:.1f} "
                 f"| {r['load']:.1f} |")
  return "\n".join(lines)


def plot(by_size: list[dict], by_len: list[dict], path: str) -> None:
  """Two panels: step time vs parameters and vs sequence length, ours and eager; wall (solid) and process CPU
  seconds (dotted, steadier on a shared machine)."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, rows, key, label in ((axes[0], by_size, "params", "parameters (M)"), (axes[1], by_len, "T",
                                                                              "sequence length T")):
    xs = [r[key] / 1e6 if key == "params" else r[key] for r in rows]
    ax.plot(xs, [r["ours"] for r in rows], "o-", color="C0", label="ours (JAX, jit train_step), wall")
    ax.plot(xs, [r["ours_cpu"] for r in rows], "o:", color="C0", label="ours, CPU s")
    ax.plot(xs, [r["eager"] for r in rows], "s-", color="C1", label="PyTorch eager (HF GPT-2), wall")
    ax.plot(xs, [r["eager_cpu"] for r in rows], "s:", color="C1", label="PyTorch eager, CPU s")
    ax.set_xlabel(label)
    ax.set_ylabel(f"seconds per step ({TOKENS} tokens)")
    ax.grid(alpha=0.3)
  axes[0].set_title("vs model size (T=256)")
  axes[1].set_title("vs sequence length (D=256, L=6)")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"float32 CPU, {common.THREADS} threads (shared machine)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "scaling.png"))
  args = ap.parse_args()
  common.header(f"scaling: {TOKENS} tokens per step, vocab 8192")
  by_size = [measure(d, layers, 256, args.reps) for d, layers in SIZES]
  mid = by_size[1]
  by_len = [mid if seq == 256 else measure(256, 6, seq, args.reps) for seq in LENGTHS]
  print("\nvs model size (T=256):\n" + table(by_size))
  print("\nvs sequence length (D=256, L=6):\n" + table(by_len))
  plot(by_size, by_len, args.out)
  print(f"wrote {args.out}; {common.load()}")


if __name__ == "__main__":
  main()
