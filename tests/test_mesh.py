"""Device meshes: every stage on (data 2 × fsdp 2 × tensor 2), (fsdp 8), (data 4 × tensor 2) equals one device;
each device holds its share of every parameter; a checkpoint written on one mesh resumes on another.

The 8-device runs are one subprocess (tests/mesh_driver.py, 8 simulated CPU devices; conftest fakes 4 here).
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import faults_driver as fd  # tests/ is on sys.path under pytest
import mesh_driver as md
from rlhf_jax import checkpoint, optimizer, parallel, trainer
from rlhf_jax.model import boxed_params, init_params, logical_axes

SIZES = {"d2f2t2": (2, 2), "f8": (8, 1), "d4t2": (1, 2)}  # (fsdp, tensor)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("mesh"))
  out = subprocess.run([sys.executable, os.path.join(fd.REPO, "tests", "mesh_driver.py"), root], env=fd.stage_env(8),
                       cwd=fd.REPO, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  return root, {name: dict(np.load(os.path.join(root, f"{name}.npz"))) for name in md.MESHES}


def test_every_stage_on_every_mesh_equals_one_device(runs):
  _, res = runs
  one = res["one"]
  start = init_params(md.GPT2, jax.random.PRNGKey(0))["layer_0"]["attn"]["q"]["kernel"]
  assert np.max(np.abs(one["pretrain['layer_0']['attn']['q']['kernel']"] - start)) > 1e-3  # it trained
  assert 0 < int(np.sum(one["ppo_tokens_1"] != md.PAD)) < one["ppo_tokens_1"].size  # real, varied responses
  compared = [k for k in one if not k.startswith("frac/")]
  assert {"pretrain_loss", "sft_loss", "reward_loss", "ppo_loss_3", "ppo_tokens_3"} <= set(compared)
  assert any(k.startswith("reward['token_head']") for k in compared) and any(k.startswith("ppo.value") for k in compared)
  newer = ("dapo", "dpo", "lora_sft", "lora_ppo")  # "dapo" also covers the final parameters (dapo.policy...)
  assert all(any(k.startswith(p) for k in compared) for p in newer)
  for name in SIZES:
    for k in compared:
      if k.startswith(newer) and name not in md.NEWER_MESHES:
        continue
      if k.startswith("ppo_tokens"):
        np.testing.assert_array_equal(res[name][k], one[k], err_msg=f"{name} {k}")
      else:
        np.testing.assert_allclose(res[name][k], one[k], atol=1e-5, rtol=1e-5, err_msg=f"{name} {k}")


def _expected_share(key: str, fsdp: int, tensor: int) -> float:
  """The rule table (parallel.RULES) spelled out per GPT-2 parameter: matrices split over fsdp × tensor, the
  position table over fsdp, head/MLP biases over tensor, model-width biases over fsdp, norms replicated."""
  if "norm" in key:
    return 1.0
  if "pos_embed" in key:
    return 1 / fsdp
  if key.endswith("['kernel']") or key.endswith("['embedding']"):
    return 1 / (fsdp * tensor)
  if any(f"['{n}']['bias']" in key for n in ("o", "fc_out")):
    return 1 / fsdp
  return 1 / tensor  # q/k/v biases (heads), fc_in bias (mlp)


def test_each_parameter_shard_is_its_share(runs):
  _, res = runs
  for name, (fsdp, tensor) in SIZES.items():
    fracs = {k[len("frac/"):]: float(v) for k, v in res[name].items() if k.startswith("frac/")}
    assert len(fracs) == len(jax.tree.leaves(init_params(md.GPT2, jax.random.PRNGKey(0))))
    for key, frac in fracs.items():
      assert frac == pytest.approx(_expected_share(key, fsdp, tensor)), (name, key, frac)
    matrices = [k for k in fracs if k.endswith("['kernel']") and "pos_embed" not in k]
    assert all(fracs[k] == pytest.approx(1 / (fsdp * tensor)) for k in matrices)


def test_checkpoint_saved_on_one_mesh_resumes_on_another(runs):
  root, res = runs
  resumed, full = (dict(np.load(os.path.join(root, f))) for f in ("resumed.npz", "f8_6.npz"))
  assert bool(resumed["layouts_ok"])  # restored straight onto the data 4 × tensor 2 shardings
  np.testing.assert_allclose(resumed["loss"], full["loss"][md.STEPS:], atol=1e-5, rtol=1e-5)
  for k in full:
    if k != "loss":
      np.testing.assert_allclose(resumed[k], full[k], atol=1e-5, rtol=1e-5, err_msg=k)
  # 8 devices (fsdp 8) -> the 4 devices of this process (data 2 × tensor 2): the same values, the new layout
  mesh = parallel.make_mesh({"tensor": 2})
  host = trainer.create_state(init_params(md.GPT2, jax.random.PRNGKey(0)),
                              optimizer.make_optimizer(md.opt_config(), 10), seed=0)
  sh = parallel.state_shardings(mesh, host, logical_axes(lambda: boxed_params(md.GPT2, jax.random.PRNGKey(0))))
  ckpt = checkpoint.Checkpointer(os.path.join(root, "ckpt"))
  state, _ = ckpt.restore(md.STEPS, parallel.with_shardings(jax.eval_shape(lambda: host), sh))
  ckpt.close()
  assert int(state.step) == md.STEPS
  assert state.params["embed"]["embedding"].sharding == sh.params["embed"]["embedding"]
  assert state.params["embed"]["embedding"].addressable_shards[0].data.shape == (md.GPT2.vocab_size // 2,
                                                                                  md.GPT2.d_model)
  for path, x in jax.tree_util.tree_leaves_with_path(parallel.to_host(state.params)):
    np.testing.assert_array_equal(x, res["f8"]["pretrain" + jax.tree_util.keystr(path)])
