"""Writes tiny random Qwen2 / Qwen3 / Mistral / scaled-RoPE LLaMA checkpoints + reference logits (needs torch).

Run like make_hf_checkpoints.py (whose _randomize and _write it reuses), in a separate virtualenv:
  python3 -m venv /tmp/hfpeer && /tmp/hfpeer/bin/pip install torch==2.13.0 transformers==4.57.6 safetensors numpy
  /tmp/hfpeer/bin/python tests/testdata/make_hf_arch_checkpoints.py
(committed files: torch 2.13.0 CPU, transformers 4.57.6; the output is deterministic.)

Every folder in testdata/hf/ holds config.json + model.safetensors (float32) and reference.npz (tokens_BxL and
transformers' float32 logits_BxLxV), checked by tests/test_hf_arch.py. All GQA (4 heads, 2 kv heads), D = 32.
  qwen2/         Qwen2ForCausalLM: q/k/v biases, tied head, rope_theta 1e6.
  qwen3/         Qwen3ForCausalLM: per-head q/k RMSNorm, head_dim 16 != D / H = 8, untied head.
  mistral/       MistralForCausalLM: sliding_window null, head_dim 12, untied head.
  llama3_rope/   LlamaForCausalLM with rope_scaling llama3 (factor 4, low 1, high 4, original 64 positions: the
                 head's four frequencies fall in all three bands), untied head.
  llama_linear/  LlamaForCausalLM with rope_scaling linear (factor 2), tied head.
"""
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_hf_checkpoints import _randomize, _write  # noqa: E402  pylint: disable=wrong-import-position

COMMON = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              intermediate_size=64, max_position_embeddings=64, rms_norm_eps=1e-6, attn_implementation="eager")


def main():
  torch.manual_seed(0)
  qwen2 = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      **COMMON, rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False))
  _randomize(qwen2, seed=21)
  _write(qwen2, "qwen2", seed=31)

  qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
      **COMMON, head_dim=16, rope_theta=1e6, tie_word_embeddings=False, attention_bias=False))
  _randomize(qwen3, seed=22)
  _write(qwen3, "qwen3", seed=32)

  mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
      **COMMON, head_dim=12, sliding_window=None, tie_word_embeddings=False))
  _randomize(mistral, seed=23)
  _write(mistral, "mistral", seed=33)

  llama3 = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **{**COMMON, "max_position_embeddings": 256}, rope_theta=10000.0, tie_word_embeddings=False,
      rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64}))
  _randomize(llama3, seed=24)
  _write(llama3, "llama3_rope", seed=34)

  linear = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **COMMON, rope_theta=10000.0, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}))
  _randomize(linear, seed=25)
  _write(linear, "llama_linear", seed=35)
  print("torch", torch.__version__, "transformers", transformers.__version__)


if __name__ == "__main__":
  main()
