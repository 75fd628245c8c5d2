"""KV-cache sampling throughput: ours (rlhf_jax.sampling.sample, jitted prefill + while_loop decode) vs HF
`generate` (same weights via save_hf_checkpoint), batch 32, prompt 32 -> 64 new tokens, sampling (temperature
1, no top-k/top-p) and greedy. Every row generates all 64 tokens on both sides (ours: an EOS id that is never
sampled, checked; HF: min_new_tokens=64). Prints generated tokens/s and ours / HF (target >= 5).

Command: .venv-bench/bin/python -m benchmarks.sampling [--reps 5]
"""
from __future__ import annotations

import argparse

from benchmarks import common

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import model, sampling  # noqa: E402

PAD = 0


def ours_sampler(cfg, params, prompts_BxP, new_tokens: int, greedy: bool, eos_id: int):
  """(call() -> Samples, compile_s) for one fixed batch and rng."""
  mask_BxP = np.ones_like(prompts_BxP)
  rng = jax.random.PRNGKey(1)

  def call():
    out = sampling.sample(params, cfg, prompts_BxP, mask_BxP, rng, max_new_tokens=new_tokens, temperature=1.0,
                          greedy=greedy, eos_id=eos_id, pad_id=PAD)
    return jax.block_until_ready(out)

  return call, common.timed(call)


def never_sampled_eos(cfg, params, prompts_BxP, new_tokens: int, greedy: bool) -> int:
  """An EOS id that no row emits with this batch and rng (rows are independent: a token absent from a full run
  stays absent when it is made the EOS), so every row generates `new_tokens` tokens."""
  eos = cfg.vocab_size - 1
  for _ in range(4):
    call, _ = ours_sampler(cfg, params, prompts_BxP, new_tokens, greedy, eos)
    s = call()
    if int(np.min(s.lengths_B)) == new_tokens:
      return eos
    seen = set(np.asarray(s.tokens_BxT).ravel().tolist())
    eos = next(t for t in range(cfg.vocab_size - 1, 0, -1) if t not in seen)
  raise RuntimeError("no EOS id found that is never sampled")


def hf_generator(hf, prompts_BxP, new_tokens: int, greedy: bool, eos_id: int):
  """(call(), first_call_s): transformers generate with the default dynamic KV cache."""
  torch = common.torch_setup()
  ids = torch.from_numpy(np.asarray(prompts_BxP, np.int64))
  kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=eos_id, pad_token_id=PAD,
                attention_mask=torch.ones_like(ids))
  if greedy:
    kwargs.update(do_sample=False, num_beams=1)
  else:
    kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)

  def call():
    with torch.no_grad():
      out = hf.generate(ids, **kwargs)
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return out

  return call, common.timed(call)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.generation_args(ap)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  common.header(f"sampling: GPT-2 D=256 L=6 H=8 vocab {args.vocab}, batch {args.batch}, prompt {args.prompt} -> "
                f"{args.new} new tokens")
  cfg = common.gpt2_config(vocab=args.vocab, max_len=256)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  prompts_BxP = np.random.default_rng(0).integers(1, args.vocab, (args.batch, args.prompt), dtype=np.int32)
  hf = common.hf_copy(cfg, params)
  n_tokens = args.batch * args.new
  for mode, greedy in (("sample", False), ("greedy", True)):
    eos = never_sampled_eos(cfg, params, prompts_BxP, args.new, greedy)
    ours, ours_compile = ours_sampler(cfg, params, prompts_BxP, args.new, greedy, eos)
    theirs, theirs_first = hf_generator(hf, prompts_BxP, args.new, greedy, eos)
    print(f"[{mode}] eos_id {eos} (never sampled: all rows {args.new} tokens); compile ours {ours_compile:.1f} s, "
          f"HF first call {theirs_first:.1f} s (attn {hf.config._attn_implementation})", flush=True)
    times, cpu = common.interleaved({"ours": ours, "HF generate": theirs}, args.reps)
    for name, ts in times.items():
      print(f"  {name:12s} wall {common.spread(ts)}, CPU {common.med(cpu[name]):.3f} s  "
            f"{n_tokens / common.med(ts):8.0f} generated tokens/s")
    print(f"RATIO [{mode}] ours / HF generate tokens/s = "
          f"{common.med(times['HF generate']) / common.med(times['ours']):.2f} wall, "
          f"{common.med(cpu['HF generate']) / common.med(cpu['ours']):.2f} CPU  (target >= 5); {common.load()}",
          flush=True)


if __name__ == "__main__":
  main()
