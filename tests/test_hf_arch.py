"""Qwen2, Qwen3, Mistral and scaled-RoPE LLaMA checkpoints: logits parity with transformers, RoPE frequencies by
hand, logical axes of the new parameters, save/load identity, KV-cache decode and greedy sampling, bad inputs.

The checkpoints and reference logits in testdata/hf/ come from tests/testdata/make_hf_arch_checkpoints.py
(transformers 4.57.6 + torch in a separate virtualenv), so these tests need no torch.
"""
import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file

from rlhf_jax import hf_import as HF
from rlhf_jax import model as M
from rlhf_jax import sampling as S

DATA = os.path.join(os.path.dirname(__file__), "testdata", "hf")
CHECKPOINTS = ["qwen2", "qwen3", "mistral", "llama3_rope", "llama_linear"]


def _load(name):
  return HF.load_hf_checkpoint(os.path.join(DATA, name))


def _reference(name):
  return np.load(os.path.join(DATA, name, "reference.npz"))


@functools.partial(jax.jit, static_argnames="cfg")
def _forward(params, tokens_BxL, *, cfg):
  return M.Transformer(cfg).apply({"params": params}, tokens_BxL)[0]


def _logits(cfg, params, tokens_BxL):
  """The full forward's logits, jitted (one compilation per config and shape, not op-by-op dispatch)."""
  return np.asarray(_forward(params, jnp.asarray(tokens_BxL), cfg=cfg))


def _edited(name, tmp_path, **changes):
  """A copy of checkpoint `name` whose config.json has `changes` (value None deletes the field)."""
  d = shutil.copytree(os.path.join(DATA, name), tmp_path / name)
  path = os.path.join(d, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w") as f:
    json.dump({k: v for k, v in config.items() if v is not None}, f)
  return str(d)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_logits_match_transformers(name):
  cfg, params = _load(name)
  ref = _reference(name)
  logits_BxLxV = _logits(cfg, params, ref["tokens_BxL"])
  assert logits_BxLxV.shape == ref["logits_BxLxV"].shape
  assert np.abs(logits_BxLxV - ref["logits_BxLxV"]).max() <= 1e-4
  assert ref["logits_BxLxV"].std() > 0.5  # random weights, far from init scale


def test_config_fields():
  qwen2, qwen3, mistral = _load("qwen2")[0], _load("qwen3")[0], _load("mistral")[0]
  assert (qwen2.family, qwen2.qkv_bias, qwen2.qk_norm, qwen2.tie_embeddings, qwen2.rope_theta) == (
      "qwen2", True, False, True, 1e6)
  assert (qwen3.family, qwen3.qkv_bias, qwen3.qk_norm, qwen3.explicit_head_dim, qwen3.head_dim) == (
      "qwen3", False, True, 16, 16)
  assert (mistral.family, mistral.head_dim, mistral.num_kv_heads, mistral.tie_embeddings) == ("mistral", 12, 2, False)
  llama3, linear = _load("llama3_rope")[0], _load("llama_linear")[0]
  assert (llama3.rope_scaling, llama3.rope_factor, llama3.rope_low_freq_factor, llama3.rope_high_freq_factor,
          llama3.rope_original_max_len, llama3.max_len) == ("llama3", 4.0, 1.0, 4.0, 64, 256)
  assert (linear.rope_scaling, linear.rope_factor, linear.tie_embeddings) == ("linear", 2.0, True)


def test_llama3_frequencies_by_hand():
  """θ = 1e4, E = 8: inv_freq 1, 0.1, 0.01, 0.001 have wavelengths 2π·(1, 10, 100, 1000). With 64 original
  positions, low 1, high 4: below 16 unchanged, above 64 divided by 4, 20π in between smoothed with
  s = (64 / 20π − 1) / 3."""
  cfg = _load("llama3_rope")[0]
  s = (64 / (20 * np.pi) - 1) / 3
  expected = [1.0, (1 - s) * 0.1 / 4 + s * 0.1, 0.01 / 4, 0.001 / 4]
  np.testing.assert_allclose(M.rope_frequencies(cfg), expected, rtol=1e-6)
  linear = _load("llama_linear")[0]
  np.testing.assert_allclose(M.rope_frequencies(linear), np.array([1.0, 0.1, 0.01, 0.001]) / 2, rtol=1e-6)


@pytest.mark.parametrize("name", ["llama3_rope", "llama_linear"])
def test_rope_scaling_changes_the_logits(name):
  """The reference is sensitive to the scaling: without it the logits are far off."""
  cfg, params = _load(name)
  ref = _reference(name)
  plain = dataclasses.replace(cfg, rope_scaling="none")
  assert np.abs(_logits(plain, params, ref["tokens_BxL"]) - ref["logits_BxLxV"]).max() > 0.05


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_param_tree_and_logical_axes_cover_the_new_parameters(name):
  cfg, params = _load(name)
  axes = M.logical_axes(lambda: M.boxed_params(cfg, jax.random.PRNGKey(0)))
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, PartitionSpec)) == jax.tree.structure(params)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype),
                                jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0))))
  attn = axes["layer_1"]["attn"]
  if name == "qwen2":
    assert attn["q"]["bias"] == PartitionSpec("heads", "head_dim")
    assert attn["k"]["bias"] == attn["v"]["bias"] == PartitionSpec("kv_heads", "head_dim")
    assert "bias" not in attn["o"]
  else:
    assert attn["q_norm"]["scale"] == attn["k_norm"]["scale"] == PartitionSpec("head_dim")
    assert params["layer_1"]["attn"]["q_norm"]["scale"].shape == (16,)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_save_load_identity(name, tmp_path):
  """load -> save -> load is the identity; the tensors and architecture written are transformers' own."""
  cfg, params = _load(name)
  HF.save_hf_checkpoint(cfg, params, str(tmp_path))
  cfg2, params2 = HF.load_hf_checkpoint(str(tmp_path))
  assert cfg2 == cfg
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  original = load_file(os.path.join(DATA, name, "model.safetensors"))
  written = load_file(tmp_path / "model.safetensors")
  assert sorted(written) == sorted(original)
  for n, x in original.items():
    assert np.array_equal(written[n], x), n
  with open(os.path.join(DATA, name, "config.json")) as f, open(tmp_path / "config.json") as g:
    hf, ours = json.load(f), json.load(g)
  for key in ("architectures", "model_type", "head_dim", "rope_theta", "rope_scaling", "tie_word_embeddings"):
    assert ours.get(key) == hf.get(key) or key not in hf, key  # Qwen2Config has no head_dim (reads it if given)


@pytest.mark.parametrize("name", ["qwen3", "llama3_rope"])
def test_kv_cache_decode_equals_full_forward(name):
  """Prefill then one token per step (q/k norm before the cache write, explicit head_dim, scaled RoPE) gives the
  full forward's logits."""
  cfg, params = _load(name)
  tokens_BxL = _reference(name)["tokens_BxL"][:, :12]
  full_BxLxV = _logits(cfg, params, tokens_BxL)
  B, L = tokens_BxL.shape
  pos_BxL, seg_BxL = np.broadcast_to(np.arange(L), (B, L)), np.ones((B, L), np.int32)
  model, P = M.Transformer(cfg), 5
  step = jax.jit(lambda params, cache, t, p, s: model.apply({"params": params, "cache": cache}, t, p, s, decode=True,
                                                            mutable=["cache"]))  # compiled once per length
  logits, state = step(params, M.init_cache(cfg, B, L), tokens_BxL[:, :P], pos_BxL[:, :P], seg_BxL[:, :P])
  steps = [np.asarray(logits[0])]
  for t in range(P, L):
    logits, state = step(params, state["cache"], tokens_BxL[:, t:t + 1], pos_BxL[:, t:t + 1], seg_BxL[:, t:t + 1])
    steps.append(np.asarray(logits[0]))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full_BxLxV, atol=1e-4)


def test_greedy_sampling_equals_the_full_forward_argmax():
  """Qwen3 greedy decode through sampling.sample == argmax of the full forward over prompt + tokens so far."""
  cfg, params = _load("qwen3")
  seq_BxL, T = _reference("qwen3")["tokens_BxL"][:, :6], 6
  prompt_BxP = seq_BxL
  for _ in range(T):
    next_B = _logits(cfg, params, seq_BxL)[:, -1].argmax(-1).astype(np.int32)
    seq_BxL = np.concatenate([seq_BxL, next_B[:, None]], axis=1)
  expected_BxT = seq_BxL[:, 6:]
  assert len(set(expected_BxT.ravel().tolist())) > 2  # not a constant continuation
  eos = min(set(range(cfg.vocab_size)) - set(expected_BxT.ravel().tolist()))  # never emitted: all T tokens
  s = S.sample(params, cfg, prompt_BxP, np.ones_like(prompt_BxP), jax.random.PRNGKey(0), max_new_tokens=T,
               greedy=True, eos_id=eos, pad_id=0)
  np.testing.assert_array_equal(np.asarray(s.tokens_BxT), expected_BxT)


@pytest.mark.parametrize("name,changes,match", [
    ("qwen2", dict(architectures=["Phi3ForCausalLM"]), r"architectures=\['Phi3ForCausalLM'\] not supported"),
    ("llama3_rope", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling rope_type='yarn'"),
    ("llama3_rope", dict(rope_scaling={"type": "dynamic", "factor": 4.0}), r"rope_scaling rope_type='dynamic'"),
    ("llama3_rope", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
     r"rope_parameters rope_type='longrope'"),
    ("llama3_rope", dict(rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0}), r"missing field 'original_max_position_embeddings'"),
    ("mistral", dict(sliding_window=16), r"sliding_window=16 < max_position_embeddings=64"),
    ("mistral", dict(sliding_window=None), r"sliding_window=4096 < max_position_embeddings=65536|^$"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=32), r"sliding_window=32 < max_position_embeddings=64"),
    ("qwen3", dict(attention_bias=True), r"attention_bias=True is not supported"),
    ("qwen3", dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
])
def test_unsupported_config_raises(name, changes, match, tmp_path):
  d = _edited(name, tmp_path, **changes)
  if match.endswith("|^$"):  # the field deleted: transformers' default window 4096 >= 64 positions loads
    assert HF.load_hf_checkpoint(d)[0] == _load(name)[0]
    return
  with pytest.raises(ValueError, match=match) as err:
    HF.load_hf_checkpoint(d)
  assert os.path.join(d, "config.json") in str(err.value)


def test_window_at_least_the_context_is_full_attention(tmp_path):
  assert HF.load_hf_checkpoint(_edited("mistral", tmp_path, sliding_window=64))[0] == _load("mistral")[0]


def test_qwen3_head_dim_defaults_to_128(tmp_path):
  """Like transformers, a Qwen3 config without head_dim means 128 (not D / H), so the stored q_proj mismatches."""
  with pytest.raises(ValueError, match=r"q_proj\.weight' has shape \(64, 32\); expected \(512, 32\)"):
    HF.load_hf_checkpoint(_edited("qwen3", tmp_path, head_dim=None))


def test_save_rejects_features_the_architecture_lacks(tmp_path):
  cfg, params = _load("qwen2")
  with pytest.raises(ValueError, match=r"family='qwen2' is saved as Qwen2ForCausalLM, which needs qkv_bias=True"):
    HF.save_hf_checkpoint(dataclasses.replace(cfg, qkv_bias=False), params, str(tmp_path))
  with pytest.raises(ValueError, match=r"family='llama' is saved as LlamaForCausalLM, which needs qkv_bias=False"):
    HF.save_hf_checkpoint(dataclasses.replace(cfg, family="llama"), params, str(tmp_path))


@pytest.mark.parametrize("kw,match", [
    (dict(family="gpt2", qk_norm=True), r"\{'qk_norm': True\} needs a LLaMA-like family"),
    (dict(family="gpt2", explicit_head_dim=16), r"explicit_head_dim': 16\} needs a LLaMA-like family"),
    (dict(rope_scaling="yarn"), r"rope_scaling='yarn'"),
    (dict(rope_scaling="linear", rope_factor=0.0), r"rope_factor=0.0 must be positive"),
    (dict(rope_scaling="llama3", rope_low_freq_factor=4.0), r"rope_low_freq_factor=4.0 must be positive and below"),
    (dict(explicit_head_dim=7), r"head_dim=7 must be even"),
])
def test_bad_new_config_fields(kw, match):
  with pytest.raises(ValueError, match=match):
    M.TransformerConfig(**{**dict(vocab_size=16, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, num_layers=1,
                                  max_len=8, family="llama"), **kw})
