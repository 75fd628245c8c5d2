"""HF checkpoints: logits parity with transformers, hand-checked layouts, bf16, save/load identity, bad inputs.

The checkpoints and reference logits in testdata/hf/ come from tests/testdata/make_hf_checkpoints.py
(transformers + torch in a separate virtualenv), so these tests need no torch.
"""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rlhf_jax import hf_import as HF
from rlhf_jax import model as M

DATA = os.path.join(os.path.dirname(__file__), "testdata", "hf")
CHECKPOINTS = ["gpt2", "llama", "llama_bf16"]


def _hf_tensors(directory):
  """All tensors of a checkpoint directory (single file or shards), read independently of hf_import."""
  names = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  out = {}
  for name in names:
    out.update(load_file(os.path.join(directory, name)))
  return out


def _copy(name, tmp_path):
  return shutil.copytree(os.path.join(DATA, name), tmp_path / name)


def _edit_config(directory, **changes):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  config = {k: v for k, v in config.items() if v is not _DELETE}
  with open(path, "w") as f:
    json.dump(config, f)


_DELETE = object()


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_logits_match_transformers(name):
  cfg, params = HF.load_hf_checkpoint(os.path.join(DATA, name))
  ref = np.load(os.path.join(DATA, name, "reference.npz"))
  logits_BxLxV, _ = M.Transformer(cfg).apply({"params": params}, jnp.asarray(ref["tokens_BxL"]))
  assert logits_BxLxV.shape == ref["logits_BxLxV"].shape
  assert np.abs(np.asarray(logits_BxLxV) - ref["logits_BxLxV"]).max() <= 1e-4
  assert ref["logits_BxLxV"].std() > 0.5  # the reference is far from trivial: random weights, not init scale


def test_scan_layers_model_from_and_to_an_hf_checkpoint(tmp_path):
  """An HF checkpoint stacked for scan_layers gives transformers' logits; saving the stacked tree writes the
  same tensors as the unrolled one."""
  cfg, params = HF.load_hf_checkpoint(os.path.join(DATA, "llama"))
  scfg = dataclasses.replace(cfg, scan_layers=True)
  ref = np.load(os.path.join(DATA, "llama", "reference.npz"))
  logits_BxLxV, _ = M.Transformer(scfg).apply({"params": M.to_layout(params, scfg)}, jnp.asarray(ref["tokens_BxL"]))
  assert np.abs(np.asarray(logits_BxLxV) - ref["logits_BxLxV"]).max() <= 1e-4
  HF.save_hf_checkpoint(scfg, M.stack_layers(params), str(tmp_path / "out"))
  original, written = _hf_tensors(os.path.join(DATA, "llama")), _hf_tensors(str(tmp_path / "out"))
  assert sorted(written) == sorted(original)
  for n, x in original.items():
    assert np.array_equal(written[n], x), n


def test_config_fields():
  gpt2, _ = HF.load_hf_checkpoint(os.path.join(DATA, "gpt2"))
  assert (gpt2.family, gpt2.vocab_size, gpt2.d_model, gpt2.num_heads, gpt2.num_kv_heads) == ("gpt2", 96, 32, 4, 4)
  assert (gpt2.d_ff, gpt2.num_layers, gpt2.max_len, gpt2.tie_embeddings) == (4 * 32, 2, 32, True)  # n_inner null
  llama, _ = HF.load_hf_checkpoint(os.path.join(DATA, "llama"))
  assert (llama.family, llama.num_heads, llama.num_kv_heads, llama.d_ff, llama.tie_embeddings) == (
      "llama", 4, 2, 64, False)
  assert (llama.rope_theta, llama.norm_eps, llama.max_len) == (500.0, 1e-5, 32)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_param_tree_matches_model_init(name):
  cfg, params = HF.load_hf_checkpoint(os.path.join(DATA, name))
  expected = jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0)))
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), expected)


def test_gpt2_layout_by_hand():
  """Fused Conv1D c_attn [D, 3D] splits q | k | v, each head-major; c_proj rows are (head, e)."""
  _, params = HF.load_hf_checkpoint(os.path.join(DATA, "gpt2"))
  t = _hf_tensors(os.path.join(DATA, "gpt2"))
  D, H, E = 32, 4, 8
  c_attn, c_attn_b, c_proj = (t[f"transformer.h.1.attn.{n}"] for n in ("c_attn.weight", "c_attn.bias",
                                                                         "c_proj.weight"))
  attn = params["layer_1"]["attn"]
  for j, n in enumerate("qkv"):
    for h in range(H):
      for e in range(E):
        assert np.array_equal(np.asarray(attn[n]["kernel"])[:, h, e], c_attn[:, j * D + h * E + e])
        assert np.asarray(attn[n]["bias"])[h, e] == c_attn_b[j * D + h * E + e]
  for h in range(H):
    assert np.array_equal(np.asarray(attn["o"]["kernel"])[h], c_proj[h * E:(h + 1) * E, :])
  assert np.array_equal(np.asarray(params["layer_1"]["mlp"]["fc_in"]["kernel"]), t["transformer.h.1.mlp.c_fc.weight"])
  assert np.array_equal(np.asarray(params["final_norm"]["bias"]), t["transformer.ln_f.bias"])


def test_llama_layout_by_hand():
  """nn.Linear stores [out, in]: q_proj[h*E + e, d] == q[d, h, e]; o_proj[d, h*E + e] == o[h, e, d]."""
  _, params = HF.load_hf_checkpoint(os.path.join(DATA, "llama"))
  t = _hf_tensors(os.path.join(DATA, "llama"))
  attn, E = params["layer_0"]["attn"], 8
  q, k, o = (np.asarray(attn[n]["kernel"]) for n in "qko")
  for d in range(0, 32, 5):
    for h in range(4):
      for e in range(E):
        assert q[d, h, e] == t["model.layers.0.self_attn.q_proj.weight"][h * E + e, d]
        assert o[h, e, d] == t["model.layers.0.self_attn.o_proj.weight"][d, h * E + e]
        if h < 2:
          assert k[d, h, e] == t["model.layers.0.self_attn.k_proj.weight"][h * E + e, d]
  assert np.array_equal(np.asarray(params["layer_0"]["mlp"]["down"]["kernel"]),
                        t["model.layers.0.mlp.down_proj.weight"].T)
  assert np.array_equal(np.asarray(params["lm_head"]["kernel"]), t["lm_head.weight"].T)


def test_bfloat16_params():
  cfg32, p32 = HF.load_hf_checkpoint(os.path.join(DATA, "llama"))
  cfg16, p16 = HF.load_hf_checkpoint(os.path.join(DATA, "llama"), param_dtype="bfloat16", dtype="bfloat16")
  assert (cfg16.param_dtype, cfg16.dtype) == ("bfloat16", "bfloat16")
  for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
    assert b.dtype == jnp.bfloat16 and b.shape == a.shape
    assert np.array_equal(np.asarray(b), np.asarray(a).astype(ml_dtypes.bfloat16))  # round to nearest
  ref = np.load(os.path.join(DATA, "llama", "reference.npz"))
  logits, _ = M.Transformer(cfg16).apply({"params": p16}, jnp.asarray(ref["tokens_BxL"]))
  assert np.abs(np.asarray(logits) - ref["logits_BxLxV"]).max() < 0.25  # bf16 compute, loosely close


def test_bfloat16_file_read_exactly():
  """A checkpoint stored in bf16 (by torch) loads to float32 values that are exactly the stored bf16 values."""
  directory = os.path.join(DATA, "llama_bf16")
  stored = _hf_tensors(directory)
  assert stored["model.norm.weight"].dtype == ml_dtypes.bfloat16
  _, params = HF.load_hf_checkpoint(directory)
  assert params["final_norm"]["scale"].dtype == jnp.float32
  assert np.array_equal(np.asarray(params["final_norm"]["scale"]), stored["model.norm.weight"].astype(np.float32))
  assert np.array_equal(np.asarray(params["embed"]["embedding"]),
                        stored["model.embed_tokens.weight"].astype(np.float32))


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("max_shard_bytes", [None, 20_000])
def test_save_load_identity(name, max_shard_bytes, tmp_path):
  """load -> save -> load is the identity, and the written tensors equal the transformers-written ones."""
  param_dtype = "bfloat16" if name == "llama_bf16" else "float32"  # keep the stored dtype
  cfg, params = HF.load_hf_checkpoint(os.path.join(DATA, name), param_dtype=param_dtype)
  out = tmp_path / "out"
  HF.save_hf_checkpoint(cfg, params, str(out), max_shard_bytes=max_shard_bytes)
  cfg2, params2 = HF.load_hf_checkpoint(str(out), param_dtype=param_dtype)
  assert cfg2 == cfg
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  original, written = _hf_tensors(os.path.join(DATA, name)), _hf_tensors(str(out))
  assert sorted(written) == sorted(original)  # same names: the files are what transformers would write
  for n, x in original.items():
    assert written[n].dtype == x.dtype and np.array_equal(written[n], x), n
  files = sorted(os.listdir(out))
  if max_shard_bytes is None:
    assert files == ["config.json", "model.safetensors"]
  else:
    with open(out / "model.safetensors.index.json") as f:
      index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and files == sorted(["config.json", "model.safetensors.index.json"] + shards)
    assert sorted(index["weight_map"]) == sorted(original)
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in original.values())
    for shard in shards:
      tensors = load_file(out / shard)
      assert sum(x.nbytes for x in tensors.values()) <= max_shard_bytes or len(tensors) == 1


def test_resave_replaces_previous_weights(tmp_path):
  cfg, params = HF.load_hf_checkpoint(os.path.join(DATA, "gpt2"))
  HF.save_hf_checkpoint(cfg, params, str(tmp_path), max_shard_bytes=10_000)
  assert "model.safetensors.index.json" in os.listdir(tmp_path)
  HF.save_hf_checkpoint(cfg, params, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_saved_config_is_hf_config(tmp_path):
  cfg, params = HF.load_hf_checkpoint(os.path.join(DATA, "llama"))
  HF.save_hf_checkpoint(cfg, params, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
  assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 500.0


def test_transformers4_style_llama_config(tmp_path):
  """Older configs keep rope_theta at the top level and have no rope_parameters."""
  d = _copy("llama", tmp_path)
  _edit_config(d, rope_parameters=_DELETE, rope_theta=500.0, rope_scaling=None, torch_dtype="float32")
  assert HF.load_hf_checkpoint(str(d))[0] == HF.load_hf_checkpoint(os.path.join(DATA, "llama"))[0]


def test_gpt2_without_transformer_prefix_and_with_mask_buffers(tmp_path):
  """OpenAI's GPT-2 uploads name tensors 'h.0...' and carry the causal-mask buffers 'h.N.attn.bias'."""
  d = _copy("gpt2", tmp_path)
  tensors = {k.removeprefix("transformer."): v for k, v in _hf_tensors(str(d)).items()}
  tensors.update({f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 32, 32), np.float32)) for i in range(2)})
  save_file(tensors, os.path.join(d, "model.safetensors"))
  _, params = HF.load_hf_checkpoint(str(d))
  _, expected = HF.load_hf_checkpoint(os.path.join(DATA, "gpt2"))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)))


@pytest.mark.parametrize("name,changes,match", [
    ("gpt2", dict(architectures=["BertModel"]), r"architectures=\['BertModel'\] not supported"),
    ("gpt2", dict(architectures=_DELETE), r"architectures=\[\] not supported"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True is not supported"),
    ("gpt2", dict(activation_function="gelu"), "activation_function='gelu' is not supported"),
    ("gpt2", dict(add_cross_attention=True), "add_cross_attention=True"),
    ("gpt2", dict(n_embd=_DELETE), "missing field 'n_embd'"),
    ("gpt2", dict(n_head=5), "not divisible by num_heads=5"),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 500.0}),
     "rope_type='yarn'"),
    ("llama", dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type='dynamic'"),
    ("llama", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    ("llama", dict(attention_bias=True), "attention_bias=True is not supported"),
    ("llama", dict(mlp_bias=True), "mlp_bias=True is not supported"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("llama", dict(head_dim=16), r"q_proj\.weight' has shape \(32, 32\); expected \(64, 32\)"),  # head_dim read
])
def test_unsupported_config_raises(name, changes, match, tmp_path):
  d = _copy(name, tmp_path)
  _edit_config(d, **changes)
  with pytest.raises(ValueError, match=match) as err:
    HF.load_hf_checkpoint(str(d))
  assert "config.json" in str(err.value)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
  d = _copy("gpt2", tmp_path)
  _edit_config(d, vocab_size=97)
  with pytest.raises(ValueError, match=r"'transformer\.wte\.weight' has shape \(96, 32\); expected \(97, 32\)"):
    HF.load_hf_checkpoint(str(d))
  d = _copy("llama", tmp_path / "x")
  _edit_config(d, num_key_value_heads=4)
  with pytest.raises(ValueError, match=r"model-0000\d-of-00003\.safetensors: tensor 'model\.layers\.0\.self_attn"
                                       r"\.k_proj\.weight' has shape \(16, 32\); expected \(32, 32\)"):
    HF.load_hf_checkpoint(str(d))


def test_missing_and_unexpected_tensors(tmp_path):
  d = _copy("gpt2", tmp_path)
  tensors = _hf_tensors(str(d))
  save_file({k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"},
            os.path.join(d, "model.safetensors"))
  with pytest.raises(ValueError, match=r"'transformer\.h\.1\.mlp\.c_fc\.bias' \(expected shape \(128,\)"):
    HF.load_hf_checkpoint(str(d))
  save_file({**tensors, "transformer.h.0.attn.c_attn.extra": np.zeros(3, np.float32)},
            os.path.join(d, "model.safetensors"))
  with pytest.raises(ValueError, match=r"unexpected tensors \['transformer\.h\.0\.attn\.c_attn\.extra'\]"):
    HF.load_hf_checkpoint(str(d))


def test_missing_files(tmp_path):
  with pytest.raises(ValueError, match="not a directory"):
    HF.load_hf_checkpoint(str(tmp_path / "nope"))
  d = _copy("llama", tmp_path)
  os.remove(os.path.join(d, "model-00002-of-00003.safetensors"))
  with pytest.raises(ValueError, match=r"index\.json: shard 'model-00002-of-00003\.safetensors' not found"):
    HF.load_hf_checkpoint(str(d))
  os.remove(os.path.join(d, "model.safetensors.index.json"))
  with pytest.raises(ValueError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json found"):
    HF.load_hf_checkpoint(str(d))
  os.remove(os.path.join(d, "config.json"))
  with pytest.raises(ValueError, match=r"config\.json: file not found"):
    HF.load_hf_checkpoint(str(d))


def test_corrupt_files(tmp_path):
  d = _copy("gpt2", tmp_path)
  with open(os.path.join(d, "model.safetensors"), "wb") as f:
    f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
    HF.load_hf_checkpoint(str(d))
  with open(os.path.join(d, "config.json"), "w") as f:
    f.write('{\n  "n_embd": 32,\n  oops\n}')
  with pytest.raises(ValueError, match=r"config\.json:3: invalid JSON"):
    HF.load_hf_checkpoint(str(d))


def test_save_rejects_bad_input(tmp_path):
  cfg, params = HF.load_hf_checkpoint(os.path.join(DATA, "gpt2"))
  with pytest.raises(ValueError, match="num_kv_heads=2 != num_heads=4"):
    HF.save_hf_checkpoint(M.TransformerConfig(96, 32, 4, 2, 128, 2, 32), params, str(tmp_path))
  wide = M.TransformerConfig(96, 32, 4, 4, 256, 2, 32)
  with pytest.raises(ValueError, match=r"layer_0/mlp/fc_in/kernel has shape \(32, 128\); expected \(32, 256\)"):
    HF.save_hf_checkpoint(wide, params, str(tmp_path))
  with pytest.raises(ValueError, match="params has no lm_head"):
    HF.save_hf_checkpoint(M.TransformerConfig(96, 32, 4, 4, 128, 2, 32, tie_embeddings=False), params,
                          str(tmp_path))
  with pytest.raises(ValueError, match="max_shard_bytes=0"):
    HF.save_hf_checkpoint(cfg, params, str(tmp_path), max_shard_bytes=0)
