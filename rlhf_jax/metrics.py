"""Metrics: sums + denominators, TensorBoard + metrics.jsonl writers, progress/ETA line, NaN/Inf guard, plots.

Step functions return metrics as `{name: (sum, count)}` pairs, exact global sums over the mesh; `summarize` divides on
the host, which is correct for masked token losses whatever the padding per device.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np


class NonFiniteLossError(FloatingPointError):
  """A loss or metric became NaN/Inf; the message names the stage and step."""


def summarize(sums: Mapping[str, tuple]) -> dict[str, float]:
  """{name: (sum, count)} -> {name: sum / count} as Python floats (count 0 -> NaN-free 0.0)."""
  out = {}
  for name, (total, count) in jax.device_get(dict(sums)).items():
    total, count = float(np.sum(total)), float(np.sum(count))
    out[name] = total / count if count else 0.0
  return out


def check_finite(metrics: Mapping[str, float], step: int, what: str = "train") -> None:
  """Raises NonFiniteLossError naming the step and the metric when any value is NaN or Inf."""
  bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
  if bad:
    raise NonFiniteLossError(
        f"{what}: non-finite {', '.join(f'{k}={metrics[k]}' for k in bad)} at step {step}; stopping. "
        f"The last good checkpoint is kept; restart the same command to resume from it.")


class MetricWriter:
  """Writes scalars to TensorBoard event files and `workdir/metrics.jsonl` (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int = 0, filename: str = "metrics.jsonl"):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, filename)
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._drop_after(resume_step)
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _drop_after(self, step: int) -> None:
    """Forgets rows past the resumed step, so a resumed run's curves have no duplicate steps."""
    if not os.path.exists(self.path):
      return
    rows = []
    with open(self.path) as f:
      for line in f:
        try:
          if json.loads(line).get("step", 0) <= step:
            rows.append(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
          continue
    with open(self.path + ".tmp", "w") as f:
      f.writelines(rows)
    os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
    """Appends one row {"step": step, prefix+name: value} and the same scalars to TensorBoard."""
    if not self.enabled:
      return
    row = {"step": int(step), **{prefix + k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Logs a block of text (e.g. sample completions) to TensorBoard and `samples.txt`."""
    if not self.enabled:
      return
    self._tb.add_text(tag, text, step)
    with open(os.path.join(os.path.dirname(self.path), "samples.txt"), "a") as f:
      f.write(f"== step {step} {tag}\n{text}\n")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """A one-line progress report: step, step/s, tokens/s and ETA since the first measured step."""

  def __init__(self, total_steps: int, first_step: int = 0):
    self.total, self.first = total_steps, first_step
    self.t0, self.step0, self.tokens = None, first_step, 0.0

  def update(self, step: int, tokens: float) -> str:
    """Records `tokens` processed up to `step`; returns the progress line (timing starts at the 1st call)."""
    now = time.perf_counter()
    if self.t0 is None:  # excludes the first (compiling) step from the rates
      self.t0, self.step0 = now, step
      return f"step {step}/{self.total} (compiling done)"
    self.tokens += tokens
    dt = max(now - self.t0, 1e-9)
    rate = (step - self.step0) / dt
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    return (f"step {step}/{self.total}  {rate:.2f} step/s  {self.tokens / dt:,.0f} tok/s  "
            f"ETA {eta:,.0f}s")

  def rates(self, step: int) -> dict[str, float]:
    """Steady-state steps/s and tokens/s measured so far."""
    if self.t0 is None or step == self.step0:
      return {}
    dt = max(time.perf_counter() - self.t0, 1e-9)
    return {"steps_per_s": (step - self.step0) / dt, "tokens_per_s": self.tokens / dt}


def read_jsonl(path: str) -> list[dict]:
  """Rows of a metrics.jsonl file ([] when it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(rows: Iterable[dict], keys: Iterable[str], png_path: str, title: str = "") -> str | None:
  """One PNG with a panel per metric key against step; returns the path (None when no key has data)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = list(rows)
  keys = [k for k in keys if any(k in r for r in rows)]
  if not keys:
    return None
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
  for ax, key in zip(axes[0], keys):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
    ax.set_title(key)
    ax.set_xlabel("step")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=80)
  plt.close(fig)
  return png_path


def plot_frontier(curves: Mapping[str, Sequence[tuple[float, float]]], png_path: str, title: str = "",
                  xlabel: str = "KL to SFT (nats per response)", ylabel: str = "held-out oracle score") -> str:
  """One PNG: a line of (x, y) points per named curve (e.g. score against KL over training); returns the path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, pts in curves.items():
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=80)
  plt.close(fig)
  return png_path
