"""Writes tiny random Hugging Face checkpoints + reference logits into tests/testdata/hf/ (needs torch).

Run with a separate virtualenv holding torch (CPU), transformers, safetensors and numpy, never the project's:
  python3 -m venv /tmp/hfpeer && /tmp/hfpeer/bin/pip install torch==2.13.0 transformers safetensors numpy
  /tmp/hfpeer/bin/python tests/testdata/make_hf_checkpoints.py
(committed files: torch 2.13.0 CPU, transformers 5.24.0; the output is deterministic.)

Each folder gets the `save_pretrained` output (config.json + safetensors) and `reference.npz` holding
`tokens_BxL` (int32) and the float32 `logits_BxLxV` of the written checkpoint reloaded by transformers,
so tests/test_hf_import.py checks parity without torch. Every parameter (norm scales and biases included) is drawn at random, so a
swapped or transposed tensor changes the logits.
  gpt2/        GPT2LMHeadModel, tied head, float32, one file.
  llama/       LlamaForCausalLM, GQA (4 heads, 2 kv heads), untied head, rope_theta 500, float32,
               sharded (model.safetensors.index.json + shards).
  llama_bf16/  LlamaForCausalLM, tied head, stored in bfloat16; logits of those weights loaded in float32.
"""
import json
import os

import numpy as np
import torch
import transformers

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
B, L = 2, 24


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Redraws every parameter: 1-d weights ~ 1 + 0.2 N, biases ~ 0.2 N, matrices ~ 0.2 N."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if p.ndim == 1 and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.2 * noise)


def _write(model: torch.nn.Module, name: str, seed: int, **save_kwargs) -> None:
  """Saves the model and the float32 logits of a fixed random token batch."""
  out = os.path.join(OUT, name)
  os.makedirs(out, exist_ok=True)
  for f in os.listdir(out):
    os.remove(os.path.join(out, f))
  model.save_pretrained(out, safe_serialization=True, **save_kwargs)
  tokens_BxL = np.random.default_rng(seed).integers(0, model.config.vocab_size, (B, L)).astype(np.int32)
  # Reload from the written files in float32 (a bf16 model's own buffers, e.g. RoPE inv_freq, would be rounded).
  reference = type(model).from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    logits_BxLxV = reference(torch.from_numpy(tokens_BxL).long()).logits.numpy().astype(np.float32)
  np.savez(os.path.join(out, "reference.npz"), tokens_BxL=tokens_BxL, logits_BxLxV=logits_BxLxV)
  sizes = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
  print(name, json.dumps(sizes))


def main():
  torch.manual_seed(0)
  gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=None,
      layer_norm_epsilon=1e-5, activation_function="gelu_new", bos_token_id=95, eos_token_id=95,
      attn_implementation="eager"))
  _randomize(gpt2, seed=1)
  _write(gpt2, "gpt2", seed=11)

  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
      intermediate_size=64, max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=500.0,
      tie_word_embeddings=False, attn_implementation="eager"))
  _randomize(llama, seed=2)
  _write(llama, "llama", seed=12, max_shard_size="40KB")

  llama_bf16 = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
      intermediate_size=48, max_position_embeddings=32, rms_norm_eps=1e-6, tie_word_embeddings=True,
      attn_implementation="eager"))
  _randomize(llama_bf16, seed=3)
  _write(llama_bf16.to(torch.bfloat16), "llama_bf16", seed=13)
  print("torch", torch.__version__, "transformers", transformers.__version__)


if __name__ == "__main__":
  main()
