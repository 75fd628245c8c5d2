"""LoRA adapters: zero init is the base, merged == x·W + (α/r)·x·A·B == the model's unmerged path (lora.join),
only adapters train, stacked layers, errors."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rlhf_jax import lora, losses, rl
from rlhf_jax import model as M


def _cfg(family, **kw):
  base = dict(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=4 if family == "gpt2" else 2, d_ff=48,
              num_layers=2, max_len=24, family=family, tie_embeddings=family == "gpt2")
  return M.TransformerConfig(**{**base, **kw})


def _spec(rank=4, alpha=8.0, targets="attn,mlp"):
  c = lora.config()
  c.update(rank=rank, alpha=alpha, targets=targets)
  return lora.Spec.from_config(c)


def _logits(cfg, params, tokens):
  return _forward(cfg, params, jnp.asarray(tokens))


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens):
  return M.Transformer(cfg).apply({"params": params}, tokens)[0]


def _tokens(B=3, L=9, seed=0):
  return np.random.default_rng(seed).integers(0, 40, (B, L)).astype(np.int32)


def _randomize_b(adapters, seed=1):
  """Nonzero B (as after training), so merged params differ from the base."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("family,targets", [("gpt2", "attn,mlp"), ("llama", "attn,mlp,lm_head"), ("llama", "q,v")])
def test_zero_initialised_adapters_give_the_base_logits_exactly(family, targets):
  cfg = _cfg(family)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  spec = _spec(targets=targets)
  adapters = lora.init(params, spec, jax.random.PRNGKey(1))
  assert all(np.all(np.asarray(b) == 0) for b in jax.tree.leaves(adapters) if b.shape[-1] != spec.rank)
  merged = lora.merge(params, adapters, spec)
  np.testing.assert_array_equal(_logits(cfg, merged, _tokens()), _logits(cfg, params, _tokens()))
  changed = _logits(cfg, lora.merge(params, _randomize_b(adapters), spec), _tokens())
  assert np.max(np.abs(changed - _logits(cfg, params, _tokens()))) > 1e-3  # the adapters do reach the logits


@pytest.mark.parametrize("family,targets,scan", [("gpt2", "attn,mlp", False), ("llama", "attn,mlp,lm_head", False),
                                                 ("llama", "attn,mlp", True)])
def test_the_models_unmerged_path_equals_the_merged_kernels(family, targets, scan):
  """lora.join (adapters attached: y = x·W + (x·(α/r)A)·B inside the model's Dense) gives the merged kernels'
  logits and gradients to 1e-5, stacked layers included; zero B gives the base's logits to float rounding (the
  extra "+ (x·A)·0" changes XLA's fusions, so not bit-exactly: that is `merge`'s W + 0 above)."""
  cfg = _cfg(family, scan_layers=scan)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  spec = _spec(targets=targets)
  zero = lora.init(params, spec, jax.random.PRNGKey(1))
  toks = jnp.asarray(_tokens())
  np.testing.assert_allclose(_logits(cfg, lora.join({"adapters": zero}, params, spec), toks),
                             _logits(cfg, params, toks), atol=1e-6, rtol=0)
  ad = _randomize_b(zero)
  attached = lora.join({"adapters": ad}, params, spec)
  layer = "layers" if scan else "layer_0"
  assert attached[layer]["attn"]["q"]["kernel"] is params[layer]["attn"]["q"]["kernel"]  # W itself, not W_eff
  assert {lora.A_LEAF, lora.B_LEAF} <= set(attached[layer]["attn"]["q"])
  np.testing.assert_allclose(_logits(cfg, attached, toks), _logits(cfg, lora.merge(params, ad, spec), toks),
                             atol=1e-5)
  assert np.max(np.abs(_logits(cfg, attached, toks) - _logits(cfg, params, toks))) > 1e-3
  batch = _lm_batch()
  loss = lambda join: jax.jit(jax.grad(lambda a: losses.lm_loss(join(a), batch, None, cfg=cfg)[0]))(ad)
  g_attached = loss(lambda a: lora.join({"adapters": a}, params, spec))
  g_merged = loss(lambda a: lora.merge(params, a, spec))
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=1e-4), g_attached, g_merged)


def test_adapter_shapes_follow_each_kernel_and_only_the_targets():
  cfg = _cfg("llama", tie_embeddings=False)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  ad = lora.init(params, _spec(rank=3, targets="q,o,down,lm_head"), jax.random.PRNGKey(1))
  attn = ad["layer_1"]["attn"]
  assert set(attn) == {"q", "o"} and set(ad["layer_0"]["mlp"]) == {"down"}
  assert attn["q"]["a"].shape == (32, 3) and attn["q"]["b"].shape == (3, 4, 8)  # q kernel (D, H, E)
  assert attn["o"]["a"].shape == (4, 8, 3) and attn["o"]["b"].shape == (3, 32)  # o kernel (H, E, D)
  assert ad["lm_head"]["a"].shape == (32, 3) and ad["lm_head"]["b"].shape == (3, 40)
  assert np.std(np.asarray(attn["o"]["a"])) == pytest.approx(1 / np.sqrt(32), rel=0.2)  # fan_in H·E = 32


@pytest.mark.parametrize("name,n_in", [("q", 1), ("o", 2), ("up", 1)])
def test_merged_kernel_equals_the_unmerged_lora_forward(name, n_in):
  """DenseGeneral with W + (α/r)·A·B == x·W + (α/r)·(x·A)·B on random inputs (<= 1e-5)."""
  cfg = _cfg("llama")
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  spec = _spec(rank=4, alpha=8.0)
  ad = _randomize_b(lora.init(params, spec, jax.random.PRNGKey(1)))
  mod = "attn" if name in ("q", "o") else "mlp"
  w = params["layer_0"][mod][name]["kernel"]
  w_eff = lora.merge(params, ad, spec)["layer_0"][mod][name]["kernel"]
  a, b = ad["layer_0"][mod][name]["a"], ad["layer_0"][mod][name]["b"]
  x = jax.random.normal(jax.random.PRNGKey(2), (5,) + w.shape[:n_in])
  axes = tuple(range(-n_in, 0))
  dense = lambda k: jnp.tensordot(x, k, axes=(axes, tuple(range(n_in))))
  unmerged = dense(w) + spec.scale * jnp.tensordot(x @ a if n_in == 1 else jnp.tensordot(x, a, axes=(axes, (0, 1))),
                                                    b, axes=1)
  np.testing.assert_allclose(dense(w_eff), unmerged, atol=1e-5)
  assert np.max(np.abs(unmerged - dense(w))) > 1e-3


def _lm_batch(seed=0, B=4, L=10):
  toks = np.random.default_rng(seed).integers(0, 40, (B, L + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "positions": np.broadcast_to(np.arange(L), (B, L)),
          "segment_ids": np.ones((B, L), np.int32), "loss_mask": np.ones((B, L), np.float32)}


def test_only_adapters_train_and_the_base_stays_bit_identical():
  """Adam on the adapters of a next-token loss: the loss falls, A and B move, the base never changes."""
  cfg = _cfg("gpt2")
  base = M.init_params(cfg, jax.random.PRNGKey(0))
  base_before = jax.tree.map(np.array, base)
  spec = _spec(rank=4, alpha=8.0)
  ad = lora.init(base, spec, jax.random.PRNGKey(1))
  tx = optax.adam(1e-2)
  opt = tx.init(ad)

  @jax.jit
  def step(ad, opt, base, batch):
    fn = lambda a: losses.lm_loss(lora.merge(base, a, spec), batch, None, cfg=cfg)[0]
    loss, g = jax.value_and_grad(fn)(ad)
    upd, opt = tx.update(g, opt, ad)
    return optax.apply_updates(ad, upd), opt, loss, g

  batch = _lm_batch()
  ad0 = ad
  ad, opt, first, g0 = step(ad, opt, base, batch)
  assert jax.tree.structure(g0) == jax.tree.structure(ad0)  # gradients exist for adapters only
  assert all(float(jnp.abs(g).max()) > 0 for p, g in jax.tree_util.tree_leaves_with_path(g0) if p[-1].key == "b")
  for _ in range(5):
    ad, opt, loss, _ = step(ad, opt, base, batch)
  assert float(loss) < float(first)
  assert all(float(jnp.abs(x - y).max()) > 0 for x, y in zip(jax.tree.leaves(ad), jax.tree.leaves(ad0)))
  jax.tree.map(np.testing.assert_array_equal, base, base_before)


def test_reference_logprobs_with_adapters_off_are_the_base_models():
  cfg = _cfg("llama")
  base = M.init_params(cfg, jax.random.PRNGKey(0))
  spec = _spec()
  trained = _randomize_b(lora.init(base, spec, jax.random.PRNGKey(1)))
  toks = _tokens()
  logp = lambda p: rl.token_logprobs(_logits(cfg, p, toks)[:, :-1], jnp.asarray(toks[:, 1:]))
  np.testing.assert_array_equal(logp(lora.merge(base, None, spec)), logp(base))
  assert np.max(np.abs(logp(lora.merge(base, trained, spec)) - logp(base))) > 1e-3


def _stack_layers(params, n):
  """scan_layers-style tree: the per-layer subtrees stacked under "layers" with a leading layer axis."""
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layer_{i}"] for i in range(n)])
  return {**{k: v for k, v in params.items() if not k.startswith("layer_")}, "layers": stacked}


def test_stacked_layer_params_get_one_adapter_per_layer_and_merge_like_unstacked():
  cfg = _cfg("llama")
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  spec = _spec(rank=2)
  ad = _randomize_b(lora.init(params, spec, jax.random.PRNGKey(1)))
  stacked = _stack_layers(params, cfg.num_layers)
  ad_stacked = _stack_layers(ad, cfg.num_layers)
  fresh = lora.init(stacked, spec, jax.random.PRNGKey(1))
  assert fresh["layers"]["attn"]["o"]["a"].shape == (2, 4, 8, 2)  # (layers, H, E, r)
  assert fresh["layers"]["mlp"]["gate"]["b"].shape == (2, 2, 48)  # (layers, r, F)
  np.testing.assert_allclose(lora.merge(stacked, ad_stacked, spec)["layers"]["attn"]["o"]["kernel"],
                             _stack_layers(lora.merge(params, ad, spec), cfg.num_layers)["layers"]["attn"]["o"][
                                 "kernel"], atol=1e-6)


def test_bfloat16_base_merges_in_float32_and_folds_back_to_bfloat16():
  cfg = _cfg("llama", param_dtype="bfloat16")
  base = M.init_params(cfg, jax.random.PRNGKey(0))
  spec = _spec()
  ad = lora.init(base, spec, jax.random.PRNGKey(1))
  merged = lora.merge(base, ad, spec)
  assert merged["layer_0"]["attn"]["q"]["kernel"].dtype == jnp.float32
  np.testing.assert_array_equal(_logits(cfg, merged, _tokens()), _logits(cfg, base, _tokens()))
  folded = lora.fold(base, _randomize_b(ad), spec)
  assert jax.tree.map(lambda x: x.dtype, folded) == jax.tree.map(lambda x: x.dtype, base)


def test_fold_equals_merge_in_float32():
  cfg = _cfg("gpt2")
  base = M.init_params(cfg, jax.random.PRNGKey(0))
  spec = _spec()
  ad = _randomize_b(lora.init(base, spec, jax.random.PRNGKey(1)))
  np.testing.assert_array_equal(_logits(cfg, lora.fold(base, ad, spec), _tokens()),
                                _logits(cfg, lora.merge(base, ad, spec), _tokens()))


def _bad(**kw):
  c = lora.config()
  c.update({"rank": 4, **kw})
  return c


@pytest.mark.parametrize("cfg,match", [
    (_bad(rank=-1), r"lora.rank=-1"),
    (_bad(alpha=0.0), r"lora.alpha=0.0"),
    (_bad(alpha=-2.0), r"lora.alpha=-2.0"),
    (_bad(targets="q,query"), r"lora.targets='q,query'.*'query'"),
    (_bad(targets=""), r"lora.targets=''"),
    (_bad(dropout=0.1), r"lora.dropout=0.1.*only lora.dropout=0"),
])
def test_bad_config_is_one_error_naming_the_field_and_value(cfg, match):
  with pytest.raises(ValueError, match=match):
    lora.Spec.from_config(cfg)


@pytest.mark.parametrize("family,targets,match", [("gpt2", "q,gate", r"'gate' matches no kernel"),
                                                  ("gpt2", "lm_head", r"'lm_head'.*tied to the embedding")])
def test_a_target_this_model_lacks_is_an_error(family, targets, match):
  params = M.init_params(_cfg(family), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=match):
    lora.init(params, _spec(targets=targets), jax.random.PRNGKey(1))


def test_rank_zero_is_off_and_merge_returns_the_base():
  spec = lora.Spec.from_config(lora.config())
  assert not spec.enabled and spec.targets == ()
  params = M.init_params(_cfg("gpt2"), jax.random.PRNGKey(0))
  assert lora.merge(params, {}, spec) is params


def test_resume_with_other_rank_or_targets_names_the_field_and_both_values():
  spec = _spec(rank=8, targets="q,v")
  lora.check_resume(spec.meta(), spec, "/w")  # same settings: fine
  with pytest.raises(ValueError, match=r"lora.rank=4 but .*'/w'.* lora.rank=8"):
    lora.check_resume(spec.meta(), _spec(rank=4, targets="q,v"), "/w")
  with pytest.raises(ValueError, match=r"lora.targets=\['attn'\] but .* lora.targets=\['q', 'v'\]"):
    lora.check_resume(spec.meta(), _spec(rank=8, targets="attn"), "/w")
  with pytest.raises(ValueError, match=r"lora.rank=8 but .* lora.rank=0"):
    lora.check_resume(None, spec, "/w")  # a full fine-tuning checkpoint


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_folded_export_reloads_with_the_unmerged_logits(name, tmp_path):
  """fold -> save_hf_checkpoint -> load_hf_checkpoint (whose logits match transformers', test_hf_import) gives the
  logits of the base with its adapters merged inside the forward (<= 1e-5)."""
  import os
  from rlhf_jax import hf_import
  cfg, base = hf_import.load_hf_checkpoint(os.path.join(os.path.dirname(__file__), "testdata", "hf", name))
  spec = _spec(rank=4, targets="attn,mlp" + (",lm_head" if not cfg.tie_embeddings else ""))
  ad = _randomize_b(lora.init(base, spec, jax.random.PRNGKey(1)))
  hf_import.save_hf_checkpoint(cfg, jax.tree.map(np.asarray, lora.fold(base, ad, spec)), str(tmp_path))
  cfg2, exported = hf_import.load_hf_checkpoint(str(tmp_path))
  toks = np.arange(1, 9, dtype=np.int32)[None] % cfg.vocab_size
  unmerged = _logits(cfg, lora.merge(base, ad, spec), toks)
  np.testing.assert_allclose(_logits(cfg2, exported, toks), unmerged, atol=1e-5)
  assert np.max(np.abs(unmerged - _logits(cfg, base, toks))) > 1e-3


def test_adapter_axes_take_the_kernels_input_and_output_names():
  from jax.sharding import PartitionSpec as P
  cfg = _cfg("llama")
  params = _stack_layers(M.init_params(cfg, jax.random.PRNGKey(0)), cfg.num_layers)
  spec = _spec(rank=2, targets="q,o")
  ad = lora.init(params, spec, jax.random.PRNGKey(1))
  base_axes = {"layers": {"attn": {"q": {"kernel": P("layers", "embed", "heads", "head_dim")},
                                   "o": {"kernel": P("layers", "heads", "head_dim", "embed")}}}}
  axes = lora.adapter_axes(base_axes, ad, spec)["layers"]["attn"]
  assert axes["q"] == {"a": P("layers", "embed", None), "b": P("layers", None, "heads", "head_dim")}
  assert axes["o"] == {"a": P("layers", "heads", "head_dim", None), "b": P("layers", None, "embed")}
  for name in ("q", "o"):
    assert len(axes[name]["a"]) == ad["layers"]["attn"][name]["a"].ndim
    assert len(axes[name]["b"]) == ad["layers"]["attn"][name]["b"].ndim
