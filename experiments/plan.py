"""Memory planner: compiles a stage's functions for N simulated devices from abstract shapes and prints the
per-device argument / output / temp bytes of each, then `peak per device: X GiB of G GiB (fits)`.

  python -m experiments.plan --stage=pretrain --model=gpt2-124m --devices=8 --device_memory_gib=80 \
      --config.mesh.fsdp=8 --config.data.seq_len=1024 --config.data.batch_size=64
"""
import os
import sys


def _flag(name: str, default: str) -> str:
  """A flag's value read from argv before absl (the device count must be set before jax is imported)."""
  for i, a in enumerate(sys.argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
  return default


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={int(_flag('devices', '8'))}").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rlhf_jax import plan  # noqa: E402

STAGE = flags.DEFINE_enum("stage", "pretrain", sorted(plan.STAGES), "Stage whose compiled functions are planned.")
MODEL = flags.DEFINE_string("model", "tiny", f"Preset ({', '.join(plan.PRESETS)}) or hf:/dir/with/config.json.")
DEVICES = flags.DEFINE_integer("devices", 8, "Simulated devices (the mesh's product).")
MEMORY = flags.DEFINE_float("device_memory_gib", 80.0, "Memory of one device, GiB.")
CONFIG = config_flags.DEFINE_config_dict("config", plan.stage_config(_flag("stage", "pretrain")), lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    lines = plan.run(STAGE.value, MODEL.value, DEVICES.value, MEMORY.value, CONFIG.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
