"""GGUF model import: files written by the gguf package from the tiny HF checkpoints (llama with llama.cpp's q/k
row permutation, qwen2 with q/k/v biases, qwen3 with q/k norms and head_dim 16) load to the HF params and logits."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from rlhf_jax import gguf_import as G
from rlhf_jax import hf_import as HF
from rlhf_jax import model as M

gguf = pytest.importorskip("gguf", reason="the optional gguf extra is not installed")
DATA = os.path.join(os.path.dirname(__file__), "testdata", "hf")
_GGUF_NAME = {**{hf: g for g, hf in G._TOP.items()},  # pylint: disable=protected-access
              **{f".{hf}.": f".{g}." for g, hf in G._BLOCK.items()}}  # pylint: disable=protected-access


def _gguf_name(hf_name: str) -> str:
  if hf_name in _GGUF_NAME:
    return _GGUF_NAME[hf_name]
  _, _, i, rest = hf_name.split(".", 3)
  module, kind = rest.rsplit(".", 1)
  return f"blk.{i}{_GGUF_NAME['.' + module + '.']}{kind}"


def _permute(w_RxD: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf's permute: rotate-half rows of each head -> interleaved pairs."""
  return w_RxD.reshape(n_head, 2, w_RxD.shape[0] // n_head // 2, *w_RxD.shape[1:]).swapaxes(1, 2).reshape(w_RxD.shape)


def _llama_cpp_rope_factors(cfg) -> np.ndarray:
  """convert_hf_to_gguf's Llama 3.1 `rope_freqs` factors (1, `factor`, or 1 / ((1 − s)/factor + s) in between)."""
  old, low, high = cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  out = []
  for freq in 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim):
    wavelen = 2 * np.pi / freq
    if wavelen < old / high:
      out.append(1.0)
    elif wavelen > old / low:
      out.append(cfg.rope_factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / cfg.rope_factor + smooth))
  return np.asarray(out, np.float32)


def _write_gguf(name: str, path: str, rope_linear: float | None = None) -> None:
  """A float32 GGUF of testdata/hf/<name> in llama.cpp's key and tensor layout (llama3 rope scaling as llama.cpp
  writes it: a `rope_freqs.weight` tensor of frequency factors, no scaling metadata)."""
  cfg, _ = HF.load_hf_checkpoint(os.path.join(DATA, name))
  arch = cfg.family
  w = gguf.GGUFWriter(path, arch=arch)
  for key, value in ((".context_length", cfg.max_len), (".embedding_length", cfg.d_model),
                     (".block_count", cfg.num_layers), (".feed_forward_length", cfg.d_ff),
                     (".attention.head_count", cfg.num_heads), (".attention.head_count_kv", cfg.num_kv_heads),
                     (".attention.key_length", cfg.head_dim), (".attention.value_length", cfg.head_dim)):
    w.add_uint32(arch + key, value)
  w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
  w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
  if rope_linear:
    w.add_string(f"{arch}.rope.scaling.type", "linear")
    w.add_float32(f"{arch}.rope.scaling.factor", rope_linear)
  tensors = {}
  if cfg.rope_scaling == "llama3":
    w.add_tensor("rope_freqs.weight", _llama_cpp_rope_factors(cfg))
  for f in sorted(os.listdir(os.path.join(DATA, name))):
    if f.endswith(".safetensors"):
      tensors.update(load_file(os.path.join(DATA, name, f)))
  for hf_name, x in sorted(tensors.items()):
    if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
      x = _permute(x, cfg.num_heads if "q_proj" in hf_name else cfg.num_kv_heads)
    w.add_tensor(_gguf_name(hf_name), np.ascontiguousarray(x, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "llama_linear", "llama3_rope"])
def test_gguf_equals_the_hf_checkpoint(name, tmp_path):
  path = str(tmp_path / f"{name}.gguf")
  cfg_hf, params_hf = HF.load_hf_checkpoint(os.path.join(DATA, name))
  _write_gguf(name, path, rope_linear=cfg_hf.rope_factor if cfg_hf.rope_scaling == "linear" else None)
  cfg, params = G.load_gguf_checkpoint(path)
  assert (cfg.family, cfg.qkv_bias, cfg.qk_norm, cfg.head_dim, cfg.rope_scaling, cfg.tie_embeddings) == (
      cfg_hf.family, cfg_hf.qkv_bias, cfg_hf.qk_norm, cfg_hf.head_dim, cfg_hf.rope_scaling, cfg_hf.tie_embeddings)
  np.testing.assert_allclose(M.rope_frequencies(cfg), M.rope_frequencies(cfg_hf), rtol=1e-5)
  assert jax.tree.structure(params) == jax.tree.structure(params_hf)
  for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params_hf)):
    assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(k)
  ref = np.load(os.path.join(DATA, name, "reference.npz"))
  logits, _ = M.Transformer(cfg).apply({"params": params}, jnp.asarray(ref["tokens_BxL"]))
  assert np.abs(np.asarray(logits) - ref["logits_BxLxV"]).max() <= 1e-4


def test_other_architecture_names_the_key(tmp_path):
  path = str(tmp_path / "phi3.gguf")
  w = gguf.GGUFWriter(path, arch="phi3")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=r"phi3\.gguf: metadata general\.architecture='phi3' is not supported "
                                       r"\(supported: \['llama', 'qwen2', 'qwen3'\]\)"):
    G.load_gguf_checkpoint(path)


def test_llama31_rope_freqs_give_its_scaling():
  """Llama-3.1-8B's own rope_scaling (E 128, θ 5e5, factor 8, low 1, high 4, old 8192: 6 intermediate factors) is
  recovered from the factors llama.cpp writes; factors of no llama3 scaling are refused naming the tensor."""
  cfg = M.TransformerConfig(vocab_size=8, d_model=128, num_heads=1, num_kv_heads=1, d_ff=8, num_layers=1, max_len=8,
                            family="llama", rope_theta=500000.0,
                            rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=8192)
  factors = _llama_cpp_rope_factors(cfg)
  assert ((factors > 1) & (factors < 8)).sum() >= 2
  got = G._llama3_rope(factors, {"rope_theta": 500000.0}, 128, "x.gguf")  # pylint: disable=protected-access
  assert got["rope_scaling"] == "llama3" and got["rope_factor"] == 8.0
  np.testing.assert_allclose(M.rope_frequencies(dataclasses.replace(cfg, **got)), M.rope_frequencies(cfg), rtol=1e-5)
  with pytest.raises(ValueError, match=r"x\.gguf: tensor 'rope_freqs\.weight' .* is not a llama3 rope scaling"):
    G._llama3_rope(np.linspace(2.0, 1.0, 64), {"rope_theta": 500000.0}, 128, "x.gguf")  # pylint: disable=protected-access
