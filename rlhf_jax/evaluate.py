"""Policy evaluation on held-out prompts: oracle score (sampled and greedy), exact match, RM score, KL to SFT.

KL to the SFT policy is measured on the policy's own samples at temperature 1:
KL(π‖π_SFT) ≈ mean over samples of Σ_t [log π(y_t|·) − log π_SFT(y_t|·)] (k1, summed over response tokens).
"""
from __future__ import annotations

import functools
import itertools
import tempfile
from typing import Any, Callable, Sequence

import jax
import numpy as np

from rlhf_jax import data, losses, parallel, ppo, rl, sampling
from rlhf_jax.model import TransformerConfig
from rlhf_jax.tokenizer import Tokenizer


def prompt_batch(tok: Tokenizer, prompts: Sequence[str], prompt_len: int) -> dict:
  """Left-padded [bos] + prompt tokens and masks for `prompts` (prompts cut from the left to fit)."""
  rows = [data.prompt_pieces({"prompt": p, "origin": f"prompt {i}"}, tok, prompt_len, truncate=True)[0]
          for i, p in enumerate(prompts)]
  return {k: np.stack([r[k] for r in rows]) for k in ("prompt_tokens", "prompt_mask")}


@functools.lru_cache(maxsize=8)
def _sampler(mesh, cfg: TransformerConfig, max_new_tokens: int, greedy: bool, temperature: float, eos_id: int,
             pad_id: int):
  return sampling.make_sampler(mesh, cfg, max_new_tokens=max_new_tokens, temperature=temperature,
                               greedy=greedy, eos_id=eos_id, pad_id=pad_id)


def generate(params, cfg: TransformerConfig, tok: Tokenizer, prompts: Sequence[str], *, prompt_len: int,
             max_new_tokens: int, greedy: bool, temperature: float = 1.0, seed: int = 0,
             batch_size: int = 64, mesh=None) -> tuple[list[str], list[sampling.Samples]]:
  """Responses (decoded text, cut at EOS) for `prompts`, sampled or greedy, in batches over `mesh` (default:
  data parallel over every device). Batch `lo`'s key is split(fold_in(PRNGKey(seed), lo), 1)[0] (device 0's under
  the former per-device pmap), the same on any mesh."""
  mesh = mesh if mesh is not None else parallel.make_mesh()
  n = parallel.batch_shards(mesh)
  batch_size = max(n, batch_size // n * n)
  sample_fn = _sampler(mesh, cfg, max_new_tokens, greedy, float(temperature), tok.eos_id, tok.pad_id)
  params = parallel.shard_tree(params, jax.tree.map(lambda _: parallel.replicated(mesh), params))
  texts, batches = [], []
  for lo in range(0, len(prompts), batch_size):
    chunk = list(prompts[lo:lo + batch_size])
    batch = prompt_batch(tok, chunk + [chunk[0]] * (batch_size - len(chunk)), prompt_len)
    sharded = parallel.put_global_batch(mesh, batch, "eval batch")
    rng = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), lo), 1)[0]
    out = parallel.to_host(sample_fn(params, sharded["prompt_tokens"], sharded["prompt_mask"], rng))
    out = jax.tree.map(lambda x: x[:len(chunk)], out)
    texts += [tok.decode(t[:n]) for t, n in zip(out.tokens_BxT, out.lengths_B)]
    batches.append(out)
  return texts, batches


@functools.partial(jax.jit, static_argnames=("cfg",))
def _response_logp(params, samples: sampling.Samples, cfg: TransformerConfig):
  T = samples.tokens_BxT.shape[1]
  logits_BxTxV, _ = ppo.response_logits(params, cfg, samples.sequence_BxPT, samples.sequence_mask_BxPT,
                                        samples.positions_BxPT, T)
  return rl.token_logprobs(logits_BxTxV, samples.sequence_BxPT[:, -T:]) * samples.mask_BxT


def kl_to_reference(params, ref_params, cfg: TransformerConfig, batches: Sequence[sampling.Samples]) -> float:
  """Mean over sampled responses of Σ_t log π(y_t) − log π_ref(y_t) (k1 estimate of KL(π‖π_ref) per response)."""
  total, n = 0.0, 0
  for s in batches:
    s = jax.tree.map(np.asarray, s)
    diff = _response_logp(params, s, cfg) - _response_logp(ref_params, s, cfg)
    total += float(np.sum(diff))
    n += s.tokens_BxT.shape[0]
  return total / max(n, 1)


def evaluate_policy(params, cfg: TransformerConfig, tok: Tokenizer, prompts: Sequence[str], *,
                    oracle: Callable[[str, str], float], exact: Callable[[str, str], bool], prompt_len: int,
                    max_new_tokens: int, ref_params=None, reward_fn: Callable[[list, list], np.ndarray] | None = None,
                    seed: int = 0, samples_per_prompt: int = 1, greedy: bool = True, mesh=None) -> dict[str, Any]:
  """Held-out metrics of one policy: oracle/exact at temperature 1 (means over `samples_per_prompt` samples of
  every prompt, with the standard error over prompts) and greedy (None with `greedy=False`), mean RM score and KL
  to the reference (on the samples)."""
  if samples_per_prompt < 1:
    raise ValueError(f"evaluate_policy: samples_per_prompt={samples_per_prompt} must be >= 1")
  repeated = [p for p in prompts for _ in range(samples_per_prompt)]
  sampled, batches = generate(params, cfg, tok, repeated, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                              greedy=False, seed=seed, mesh=mesh)
  oracle_P = np.mean(np.reshape([oracle(p, r) for p, r in zip(repeated, sampled)], (len(prompts), -1)), axis=1)
  out = {"oracle_sampled": float(np.mean(oracle_P)), "oracle_sampled_se": standard_error(oracle_P),
         "exact_sampled": float(np.mean([exact(p, r) for p, r in zip(repeated, sampled)])),
         "oracle_greedy": None, "exact_greedy": None}
  greedy_texts = [""] * len(prompts)
  if greedy:
    greedy_texts, _ = generate(params, cfg, tok, prompts, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                               greedy=True, mesh=mesh)
    out["oracle_greedy"] = float(np.mean([oracle(p, r) for p, r in zip(prompts, greedy_texts)]))
    out["exact_greedy"] = float(np.mean([exact(p, r) for p, r in zip(prompts, greedy_texts)]))
  if reward_fn is not None:
    out["rm_score"] = float(np.mean(reward_fn(repeated, sampled)))
  if ref_params is not None:
    out["kl_to_sft"] = kl_to_reference(params, ref_params, cfg, batches)
  out["examples"] = [(p, s, g) for p, s, g in zip(prompts[:6], sampled[::samples_per_prompt][:6], greedy_texts[:6])]
  return out


def standard_error(x_P: np.ndarray) -> float:
  """Standard error of the mean of per-prompt values: std (Bessel-corrected) / sqrt(P); 0 for one prompt."""
  x_P = np.asarray(x_P, np.float64)
  return float(np.std(x_P, ddof=1) / np.sqrt(len(x_P))) if len(x_P) > 1 else 0.0


def corpus_loss(params, cfg: TransformerConfig, tok: Tokenizer, corpus: str, batches: int = 20, seq_len: int = 64,
                batch_size: int = 32) -> float:
  """Next-token loss per token on the first `batches` packed batch_size x seq_len rows of a text corpus."""
  with tempfile.TemporaryDirectory() as tmp:
    loader = data.make_lm_loader([corpus], tok, seq_len, batch_size, 0, tmp, train=False, local_device_count=1)
    total = count = 0.0
    for batch in itertools.islice(iter(loader), batches):
      _, aux = _lm_loss(params, batch, cfg)
      total, count = total + float(aux["loss"][0]), count + float(aux["loss"][1])
  return total / count


@functools.partial(jax.jit, static_argnames=("cfg",))
def _lm_loss(params, batch, cfg: TransformerConfig):
  return losses.lm_loss(params, batch, None, cfg=cfg)
