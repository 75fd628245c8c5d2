"""Shared trainer: device equivalence, gradient accumulation, resume, NaN guard, masked LM loss."""
import functools

import jax
import numpy as np
import pytest

from rlhf_jax import losses, metrics, optimizer, parallel, trainer
from rlhf_jax.model import Transformer, TransformerConfig, boxed_params, init_params, logical_axes

CFG = TransformerConfig(vocab_size=32, d_model=16, num_heads=2, num_kv_heads=2, d_ff=32, num_layers=1, max_len=16)


def _batch(seed, B=8, L=12, pad=True):
  """A packed-looking LM batch with rows of different padding (so devices see different token counts)."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, 32, (B, L + 1)).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  if pad:
    for b in range(B):
      seg[b, L - (b * 3) % L // 2:] = 0
    seg[:, 5:] += seg[:, 5:] > 0  # two documents per row
  pos = np.zeros((B, L), np.int32)
  for b in range(B):
    for t in range(1, L):
      pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos, "segment_ids": seg,
          "loss_mask": (seg > 0).astype(np.float32)}


def _opt(**kw):
  opt = optimizer.default_config(lr=1e-2)
  opt.schedule, opt.warmup_steps, opt.weight_decay = "constant", 0, 0.0
  opt.update(kw)
  return opt


def _state(opt):
  return trainer.create_state(init_params(CFG, jax.random.PRNGKey(0)), optimizer.make_optimizer(opt, 10), seed=0)


LOSS = functools.partial(losses.lm_loss, cfg=CFG)


def _step_on(devices, state, batch, mesh_cfg=None):
  """One compiled train step on a mesh of `devices` (default layout: data parallel); host state and metrics."""
  mesh = parallel.make_mesh(mesh_cfg, devices)
  sh = parallel.state_shardings(mesh, state, logical_axes(lambda: boxed_params(CFG, jax.random.PRNGKey(0))))
  p_train, _ = trainer.compile_steps(LOSS, mesh, sh)
  new, sums = p_train(parallel.shard_tree(state, sh), parallel.put_batch(mesh, batch, "data.batch_size"))
  return parallel.to_host(new), metrics.summarize(parallel.to_host(sums))


def test_four_devices_equal_one_device_on_the_full_batch():
  assert jax.local_device_count() == 4
  state = _state(_opt())
  batch = _batch(0)
  new4, m4 = _step_on(jax.local_devices(), state, batch)
  new1, m1 = _step_on(jax.local_devices()[:1], state, batch)
  newf, mf = _step_on(jax.local_devices(), state, batch, {"fsdp": 2, "tensor": 2})
  for a, b, c in zip(jax.tree.leaves(new4.params), jax.tree.leaves(new1.params), jax.tree.leaves(newf.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(c, b, atol=1e-5)
  assert abs(m4["loss"] - m1["loss"]) < 1e-5 and abs(mf["loss"] - m1["loss"]) < 1e-5
  # the loss is the mean over real tokens, not a mean of per-device means
  logits, _ = Transformer(CFG).apply({"params": state.params}, batch["inputs"], batch["positions"],
                                     batch["segment_ids"])
  logp = jax.nn.log_softmax(np.asarray(logits))
  nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
  expected = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  assert abs(m4["loss"] - expected) < 1e-5


def test_gradient_accumulation_equals_one_big_batch():
  big = _batch(1, B=16, pad=False)
  one_step, _ = _step_on(jax.local_devices(), _state(_opt()), big)
  state = _state(_opt(grad_accum=4))
  for i in range(4):
    micro = jax.tree.map(lambda x: x[i * 4:(i + 1) * 4], big)
    state, _ = _step_on(jax.local_devices(), state, micro)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(one_step.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)


class _Loader:
  """Deterministic synthetic loader with a resumable position; can crash at a given position."""

  def __init__(self, crash_at=-1):
    self.position, self.crash_at = 0, crash_at

  def __next__(self):
    if self.position == self.crash_at:
      raise KeyboardInterrupt("simulated preemption")
    self.position += 1
    return _batch(100 + self.position)

  def get_state(self):
    return {"position": self.position}

  def set_state(self, d):
    self.position = d["position"]


def _train_cfg(**kw):
  t = trainer.train_config(num_steps=6)
  t.log_every, t.eval_every, t.checkpoint_every = 1, 0, 2
  t.update(kw)
  return t


def _run(workdir, loader, **kw):
  opt = _opt(schedule="cosine", warmup_steps=2)
  return trainer.train_loop(
      workdir=str(workdir), train_cfg=_train_cfg(**kw), loss_fn=LOSS, train_loader=loader,
      scratch_state=lambda: trainer.create_state(init_params(CFG, jax.random.PRNGKey(0)),
                                                 optimizer.make_optimizer(opt, 6), seed=0),
      eval_batches=lambda: iter([_batch(7), _batch(8)]), stage="test")


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
  full, last = _run(tmp_path / "a", _Loader())
  with pytest.raises(KeyboardInterrupt):
    _run(tmp_path / "b", _Loader(crash_at=3))  # dies during step 4, after the step-2 checkpoint
  resumed, _ = _run(tmp_path / "b", _Loader())
  assert int(resumed.step) == 6
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  rows = metrics.read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
  train_steps = [r["step"] for r in rows if "train_loss" in r]
  assert train_steps == [1, 2, 3, 4, 5, 6]  # rows written after the checkpoint were dropped on resume
  assert any("eval_loss" in r for r in rows)
  assert last["loss"] > 0 and np.isfinite(last["loss"])


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(metrics.NonFiniteLossError, match="at step 5"):
    _run(tmp_path, _Loader(), nan_at_step=5)
  from rlhf_jax import checkpoint
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 4
  state, _ = _run(tmp_path, _Loader())  # restartable: resumes from step 4 and finishes
  assert int(state.step) == 6


def test_sft_mask_ignores_prompt_side_targets():
  params = init_params(CFG, jax.random.PRNGKey(0))
  batch = _batch(3, pad=False)
  batch["loss_mask"][:, :4] = 0.0  # the first 4 targets are "prompt"
  base, _ = LOSS(params, batch, None)
  changed = dict(batch, targets=batch["targets"].copy())
  changed["targets"][:, :4] = (changed["targets"][:, :4] + 5) % 32
  again, _ = LOSS(params, changed, None)
  assert float(base) == float(again)
  changed["targets"][:, 6] = (changed["targets"][:, 6] + 5) % 32
  assert float(LOSS(params, changed, None)[0]) != float(base)


def test_lm_loss_accuracy_counts_masked_targets_with_the_largest_logit():
  params = init_params(CFG, jax.random.PRNGKey(1))
  batch = _batch(4)
  logits = np.asarray(Transformer(CFG).apply({"params": params}, batch["inputs"], batch["positions"],
                                             batch["segment_ids"])[0])
  batch["targets"] = batch["targets"].copy()  # (a view of the same tokens as the inputs)
  batch["targets"][:, ::2] = logits.argmax(-1)[:, ::2]  # half the targets are the model's top token
  _, aux = LOSS(params, batch, None)
  want = np.sum((logits.argmax(-1) == batch["targets"]) * batch["loss_mask"])
  assert 0 < want < batch["loss_mask"].sum()
  assert float(aux["accuracy"][0]) == want and float(aux["accuracy"][1]) == batch["loss_mask"].sum()


def test_batch_not_divisible_by_devices_names_the_field():
  with pytest.raises(ValueError, match=r"data.batch_size=6 .*batch shards \(mesh.data × mesh.fsdp = 4 × 1 = 4\)"):
    parallel.put_batch(parallel.make_mesh(), _batch(0, B=6), "data.batch_size")


def test_resume_with_other_parameters_names_them(tmp_path):
  """A workdir written with other params (e.g. an RM without the likelihood feature) stops with a ValueError
  naming the workdir and the differing parameters, in either direction, before orbax's own structure error."""
  from rlhf_jax import checkpoint
  params = {"head": np.zeros((3,), np.float32), "loglik": np.float32(0.5)}
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, {"params": params, "step": np.int32(1)}, {"meta": {}})
  ckpt.close()
  for abstract, want in (({"params": {"head": params["head"]}, "step": np.int32(0)}, r"unexpected \['params/loglik'\]"),
                         ({"params": {**params, "token_head": params["head"]}, "step": np.int32(0)},
                          r"missing \['params/token_head'\]")):
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    with pytest.raises(ValueError, match=f"checkpoints/1: the saved state does not match.*{want}"):
      ckpt.restore(1, jax.eval_shape(lambda: abstract))
    ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  state, _ = ckpt.restore(1, jax.eval_shape(lambda: {"params": params, "step": np.int32(0)}))
  ckpt.close()
  assert float(state["params"]["loglik"]) == 0.5
