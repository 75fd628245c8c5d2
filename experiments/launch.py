"""Flags every experiment shares (--config, --workdir, multi-host) and the thin `main` around a stage function."""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import host, parallel

CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs (resumes if present).")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-host: coordinator host:port ('auto' on TPU pods/SLURM; "
    "default $JAX_COORDINATOR_ADDRESS; empty = single process).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes ($JAX_NUM_PROCESSES).")
PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-host: this process's index ($JAX_PROCESS_ID).")
KEEP_HOST_MEMORY = flags.DEFINE_bool(
    "keep_host_memory", True, "CPU runs: glibc malloc keeps freed memory for reuse instead of faulting XLA's "
    "per-step buffers in again (rlhf_jax/host.py; ~20% of a pretraining step here).")


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO chatter of orbax/tfds (each checkpoint logs ~20 lines); warnings and errors pass."""

  def filter(self, record):
    noisy = "orbax" in record.pathname or "tensorflow_datasets" in record.pathname
    return record.levelno >= logging.logging.WARNING or not noisy


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown --config field (locked ConfigDict) reported as one error line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    name = str(e).strip("\"'")
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a.split("=")[0]]
    sys.exit(f"error: unknown config field {bad[0] if bad else name!r} ({name!r} is not in the config; see the "
             f"config file's get_config())")


def run(stage_fn: Callable[..., dict]) -> None:
  """Parses flags, starts the multi-controller runtime if asked, logs devices and runs `stage_fn(cfg, workdir)`."""
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if KEEP_HOST_MEMORY.value and host.cpu_only():  # before jax creates its CPU client (see host.py)
      logging.info("host memory: glibc malloc keeps freed memory: %s", host.keep_freed_memory())
    parallel.initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    logging.info(parallel.describe_devices())
    try:
      result = stage_fn(CONFIG.value, WORKDIR.value)
    except ValueError as e:  # bad input or config: the message names the file:line or config field
      sys.exit(f"error: {e}")
    logging.info("result: %s", result)

  app.run(main, flags_parser=_parse_flags)
