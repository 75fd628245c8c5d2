"""LoRA in the stages: resume bit-exact, checkpoint size, downstream merges, RM/PPO/DPO on adapters (4 devices ==
1: tests/test_mesh_paths.py)."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures
from rlhf_jax import checkpoint, dpo, lora, losses, metrics, optimizer, ppo, stages, trainer
from rlhf_jax.model import Transformer, init_params
from test_trainer import CFG, _Loader, _batch

SPEC = lora.Spec(rank=2, alpha=4.0, targets=("attn", "mlp"))


def _lora_cfg(**kw):
  c = lora.config()
  c.update({"rank": 2, "alpha": 4.0, **kw})
  return c


# ------------------------------------------------------------------------------ train_loop with a frozen base


def _run(workdir, loader, base):
  opt = optimizer.default_config(lr=1e-2)
  opt.schedule, opt.warmup_steps = "cosine", 2
  t = trainer.train_config(num_steps=6)
  t.log_every, t.eval_every, t.checkpoint_every = 1, 0, 2
  return trainer.train_loop(
      workdir=str(workdir), train_cfg=t, loss_fn=lora.with_base(functools.partial(losses.lm_loss, cfg=CFG), SPEC),
      train_loader=loader, frozen=base,
      scratch_state=lambda: trainer.create_state(lora.split(base, SPEC, jax.random.PRNGKey(1))[0],
                                                 optimizer.make_optimizer(opt, 6), seed=0),
      eval_batches=lambda: iter([_batch(7)]), stage="test")


def test_lora_resume_after_interruption_is_bit_identical(tmp_path):
  base = init_params(CFG, jax.random.PRNGKey(0))
  full, _ = _run(tmp_path / "a", _Loader(), base)
  with pytest.raises(KeyboardInterrupt):
    _run(tmp_path / "b", _Loader(crash_at=3), base)  # dies during step 4, after the step-2 checkpoint
  resumed, _ = _run(tmp_path / "b", _Loader(), base)
  assert int(resumed.step) == 6 and set(resumed.params) == {"adapters"}
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  assert float(np.abs(full.params["adapters"]["layer_0"]["attn"]["q"]["b"]).max()) > 0  # it trained


# ------------------------------------------------------------------------------ stages on the tiny pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return fixtures.pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def lora_sft(pipe, tmp_path_factory):
  """A LoRA SFT workdir (rank 2, attn+mlp) on the pipeline's pretrained model, 4 steps at lr 1e-2."""
  wd = str(tmp_path_factory.mktemp("lora") / "sft")
  cfg = fixtures.sft_cfg(pipe, pipe["pretrain"], steps=4)
  cfg.opt.lr, cfg.lora = 1e-2, _lora_cfg()
  stages.run_lm(cfg, wd, "sft")
  return wd, cfg


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_lora_sft_checkpoint_holds_adapters_only_and_is_much_smaller(pipe, lora_sft):
  wd, _ = lora_sft
  params, extra = checkpoint.load_params(wd)
  assert set(params) == {"adapters"}
  assert extra["meta"]["lora"]["rank"] == 2 and extra["meta"]["lora_base"] == pipe["pretrain"]
  step = lambda d: os.path.join(d, checkpoint.CHECKPOINT_DIR, str(checkpoint.Checkpointer(d, create=False)
                                                                   .latest_step()))
  ours, full = _dir_bytes(step(wd)), _dir_bytes(step(pipe["sft"]))
  assert ours < full / 4, (ours, full)


def test_downstream_loads_the_lora_sft_workdir_merged(pipe, lora_sft):
  wd, _ = lora_sft
  model, merged, _ = stages.load_policy(wd)
  base = stages.load_policy(pipe["pretrain"])[1]
  adapters = checkpoint.load_params(wd)[0]["adapters"]
  expect = lora.fold(base, adapters, SPEC)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), merged, expect)
  toks = jnp.asarray(np.arange(1, 17, dtype=np.int32)[None])
  logits = lambda p: Transformer(model).apply({"params": p}, toks)[0]
  assert float(jnp.abs(logits(merged) - logits(base)).max()) > 1e-3  # the adapters trained


def test_resuming_a_lora_workdir_with_another_rank_or_targets_names_both_values(pipe, lora_sft):
  wd, cfg = lora_sft
  cfg = cfg.copy_and_resolve_references()
  cfg.lora.rank = 4
  with pytest.raises(ValueError, match=r"lora.rank=4 but .* lora.rank=2"):
    stages.run_lm(cfg, wd, "sft")
  cfg.lora.rank, cfg.lora.targets = 2, "q,v"
  with pytest.raises(ValueError, match=r"lora.targets=\['q', 'v'\] but .* lora.targets=\['attn', 'mlp'\]"):
    stages.run_lm(cfg, wd, "sft")
  cfg.lora.rank = 0
  with pytest.raises(ValueError, match=r"lora.rank=0 but .* lora.rank=2"):
    stages.run_lm(cfg, wd, "sft")


def test_lora_without_init_from_is_an_error(pipe, tmp_path):
  cfg = fixtures.pretrain_cfg(pipe)
  cfg.lora = _lora_cfg()
  with pytest.raises(ValueError, match=r"lora.rank=2 needs train.init_from"):
    stages.run_lm(cfg, str(tmp_path / "x"), "pretrain")


def test_lora_reward_model_trains_adapters_and_head_and_loads_merged(pipe, lora_sft, tmp_path):
  wd = str(tmp_path / "rm")
  cfg = fixtures.reward_cfg(pipe, lora_sft[0], steps=3)
  cfg.lora = _lora_cfg()
  stages.run_reward(cfg, wd)
  saved = checkpoint.load_params(wd)[0]
  assert set(saved) == {"adapters", "head"}
  model, params, _ = stages.load_reward_model(wd)
  sft = stages.load_policy(lora_sft[0])[1]  # the RM's base: the LoRA SFT model, merged
  expect = lora.fold(sft, saved["adapters"], SPEC)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), params["backbone"], expect)
  assert os.path.exists(os.path.join(wd, stages.NORM_FILE))


def test_lora_ppo_runs_on_adapters_and_its_policy_loads_merged(pipe, lora_sft, tmp_path):
  """PPO init_from a LoRA SFT workdir: iteration 1's policy is the reference exactly (B = 0), the checkpoint holds
  adapters (policy) and adapters + head (value), and load_policy folds the policy onto the SFT model."""
  wd = str(tmp_path / "ppo")
  cfg = fixtures.ppo_cfg(pipe, lora_sft[0], pipe["rm"], steps=2)
  cfg.opt.lr, cfg.lora = 1e-2, _lora_cfg()
  ppo.run(cfg, wd)
  rows = metrics.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert abs(rows[0]["kl_k1"]) < 1e-5  # sampler log-probs vs the reference's full forward: rounding only
  saved = checkpoint.load_params(wd)[0]
  assert set(saved["policy"]) == {"adapters"} and set(saved["value"]) == {"adapters", "head"}
  _, policy, _ = stages.load_policy(wd)
  sft = stages.load_policy(lora_sft[0])[1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), policy,
               lora.fold(sft, saved["policy"]["adapters"], SPEC))


def _dpo_cfg(pipe, init_from, ref_logp):
  cfg = dpo.config()
  cfg.data.update(train=pipe["comparisons"], seq_len=48, batch_size=8, max_responses=2)
  cfg.dpo.ref_logp = ref_logp
  cfg.train.update(init_from=init_from, num_steps=3, log_every=1, eval_every=0, checkpoint_every=3)
  cfg.opt.update(warmup_steps=0, lr=1e-2)
  cfg.lora = _lora_cfg()
  return cfg


def test_lora_dpo_reference_is_the_base_precomputed_or_on_the_fly(pipe, lora_sft, tmp_path):
  """DPO from a LoRA SFT workdir: step 1 sits at the reference (loss log 2: B = 0), the policy moves, and the
  on-the-fly reference (the frozen base, adapters off) gives the same adapters as the precomputed one."""
  out = {}
  for mode in ("precompute", "on_the_fly"):
    wd = str(tmp_path / mode)
    dpo.run_dpo(_dpo_cfg(pipe, lora_sft[0], mode), wd)
    rows = metrics.read_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert abs(rows[0]["train_loss"] - np.log(2)) < 1e-5 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    out[mode] = checkpoint.load_params(wd)[0]
    assert set(out[mode]) == {"policy"} and set(out[mode]["policy"]) == {"adapters"}
  for a, b in zip(jax.tree.leaves(out["precompute"]), jax.tree.leaves(out["on_the_fly"])):
    np.testing.assert_allclose(a, b, atol=1e-5)
  _, policy, _ = stages.load_policy(str(tmp_path / "precompute"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), policy,
               lora.fold(stages.load_policy(lora_sft[0])[1], out["precompute"]["policy"]["adapters"], SPEC))
