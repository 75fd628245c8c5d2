"""Sampler: log-probs == full forward, greedy == argmax loop, padding sides, EOS masks, filters, frequencies."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import model as M
from rlhf_jax import parallel
from rlhf_jax import sampling as S

FAMILIES = ["gpt2", "llama"]
V, EOS, PAD = 40, 1, 0
LENGTHS = (5, 2, 4)  # prompts of different lengths batched together
P, T = 6, 7


def _cfg(family):
  return M.TransformerConfig(vocab_size=V, d_model=32, num_heads=4, num_kv_heads=4 if family == "gpt2" else 2,
                             d_ff=48, num_layers=2, max_len=16, family=family, tie_embeddings=family == "gpt2")


def _params(cfg, seed=0):
  """Random params with the final norm scaled up, so next-token distributions are peaked (clear argmax)."""
  params = M.init_params(cfg, jax.random.PRNGKey(seed))
  final = dict(params["final_norm"], scale=params["final_norm"]["scale"] * 6.0)
  return dict(params, final_norm=final)


def _prompts(seed=1):
  rng = np.random.default_rng(seed)
  return [rng.integers(2, V, size=n).tolist() for n in LENGTHS]


def _pad(prompts, side):
  """Batch of prompts padded to P on `side` with pad slots holding junk (not PAD), and the 0/1 mask."""
  tokens, mask = np.full((len(prompts), P), 37, np.int32), np.zeros((len(prompts), P), np.int32)
  for i, p in enumerate(prompts):
    sl = slice(P - len(p), P) if side == "left" else slice(0, len(p))
    tokens[i, sl], mask[i, sl] = p, 1
  return tokens, mask


@functools.partial(jax.jit, static_argnums=0)
def _forward_logprobs(cfg, params, tokens_BxL, positions_BxL, segment_ids_BxL):
  """Full forward (no cache), log softmax over the vocab: BxLxV."""
  logits, _ = M.Transformer(cfg).apply({"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL)
  return jax.nn.log_softmax(logits, axis=-1)


def _full_logprobs(cfg, params, seq):
  """Log-probs of one unpadded sequence by a full forward: LxV (slots after it are segment 0, one compile)."""
  n = len(seq)
  tokens, segs = np.zeros((1, cfg.max_len), np.int32), np.zeros((1, cfg.max_len), np.int32)
  tokens[0, :n], segs[0, :n] = seq, 1
  positions = np.arange(cfg.max_len)[None]
  return np.asarray(_forward_logprobs(cfg, params, tokens, positions, segs))[0, :n]


def _greedy_reference(cfg, params, prompt):
  """Plain Python loop: full forward over prompt + generated so far, argmax of the last slot; T tokens, no EOS."""
  seq, out, logps = list(prompt), [], []
  for _ in range(T):
    logp = _full_logprobs(cfg, params, seq)[-1]
    tok = int(np.argmax(logp))
    out.append(tok), logps.append(logp[tok]), seq.append(tok)
  return out, logps


def _cut_at(tokens, logps, eos):
  """Truncates a continuation after its first EOS."""
  n = tokens.index(eos) + 1 if eos in tokens else len(tokens)
  return tokens[:n], logps[:n]


def test_left_align_is_stable_partition():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, size=(5, 9)).astype(np.int32)
  mask = (rng.random((5, 9)) < 0.6).astype(np.int32)
  mask[0] = [1, 1, 1, 0, 0, 0, 0, 0, 0]  # right padded
  mask[1] = [0, 1, 0, 1, 1, 0, 1, 0, 0]  # holes
  out_tokens, out_mask = S.left_align(tokens, mask)
  for b in range(5):
    real = tokens[b][mask[b] == 1]
    pads = tokens[b][mask[b] == 0]
    np.testing.assert_array_equal(out_tokens[b], np.concatenate([pads, real]))
    np.testing.assert_array_equal(out_mask[b], [0] * len(pads) + [1] * len(real))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_argmax_loop_for_both_padding_sides(family):
  """Batched greedy (mixed lengths, left or right padded) == each prompt's own argmax loop; EOS stops a row."""
  cfg, params = _cfg(family), _params(_cfg(family))
  prompts = _prompts()
  no_eos = [_greedy_reference(cfg, params, p) for p in prompts]
  eos = no_eos[1][0][2]  # row 1 stops by its third token; others stop where this token first appears (or not)
  refs = [_cut_at(*ref, eos) for ref in no_eos]
  assert len(refs[1][0]) <= 3
  outs = []
  for side in ("left", "right"):
    tokens, mask = _pad(prompts, side)
    s = S.sample(params, cfg, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=T, greedy=True, eos_id=eos,
                 pad_id=PAD)
    for b, (ref_tokens, ref_logps) in enumerate(refs):
      n = len(ref_tokens)
      np.testing.assert_array_equal(s.tokens_BxT[b], ref_tokens + [PAD] * (T - n))
      np.testing.assert_array_equal(s.mask_BxT[b], [1] * n + [0] * (T - n))
      np.testing.assert_allclose(s.logprobs_BxT[b, :n], ref_logps, atol=1e-5)
      np.testing.assert_array_equal(s.logprobs_BxT[b, n:], 0.0)
      assert s.lengths_B[b] == n and bool(s.ended_with_eos_B[b]) == (ref_tokens[-1] == eos)
    np.testing.assert_array_equal(s.sampling_logprobs_BxT, 0.0)
    outs.append(s)
  jax.tree.map(np.testing.assert_array_equal, outs[0], outs[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_logprobs_equal_full_forward(family):
  """Temperature/top-k/top-p sampling: logprobs_BxT == full-forward log-probs of the same left-padded sequence."""
  cfg, params = _cfg(family), _params(_cfg(family), seed=2)
  tokens, mask = _pad(_prompts(3), "right")
  opts = dict(max_new_tokens=T, temperature=1.3, top_k=12, top_p=0.95, pad_id=PAD)
  first = S.sample(params, cfg, tokens, mask, jax.random.PRNGKey(4), eos_id=EOS, **opts)
  eos = int(first.tokens_BxT[0, 2])  # the same draws hit this token, so row 0 stops at step <= 2
  s = S.sample(params, cfg, tokens, mask, jax.random.PRNGKey(4), eos_id=eos, **opts)
  resp = np.asarray(s.tokens_BxT)
  # Expected layout built by hand: left-aligned prompt, response up to the first EOS, positions 0.. per row.
  seq, seg = np.full((3, P + T), PAD, np.int32), np.zeros((3, P + T), np.int32)
  for b, n in enumerate(LENGTHS):
    hit = np.flatnonzero(resp[b] == eos)
    r = hit[0] + 1 if hit.size else T
    seq[b, P - n:P], seg[b, P - n:P] = tokens[b, :n], 1
    seq[b, P:P + r], seg[b, P:P + r] = resp[b, :r], 1
  assert seg[0, P:].sum() <= 3
  pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0)
  np.testing.assert_array_equal(s.sequence_BxPT, seq)
  np.testing.assert_array_equal(s.sequence_mask_BxPT, seg)
  np.testing.assert_array_equal(np.asarray(s.positions_BxPT)[seg == 1], pos[seg == 1])
  np.testing.assert_array_equal(s.mask_BxT, seg[:, P:])
  logp = np.asarray(_forward_logprobs(cfg, params, seq, pos, seg))
  expected = np.take_along_axis(logp[:, P - 1:-1], seq[:, P:, None], axis=-1)[..., 0] * seg[:, P:]
  np.testing.assert_allclose(s.logprobs_BxT, expected, atol=1e-5)
  assert (np.asarray(s.sampling_logprobs_BxT)[seg[:, P:] == 1] > -np.inf).all()
  slot_logp = logp[:, P - 1:-1].astype(np.float64)  # unfiltered temperature-1 distribution of each response slot
  entropy = -np.sum(np.exp(slot_logp) * slot_logp, axis=-1) * seg[:, P:]
  np.testing.assert_allclose(s.entropy_BxT, entropy, atol=1e-5)
  assert entropy[seg[:, P:] == 1].min() > 0.01  # not a trivially zero entropy


def test_decode_logprobs_equal_full_forward_to_float32_rounding():
  """PPO takes its old log-probs from the sampler: on a larger batch than the other tests (GPT-2, V=512, 32 + 32
  slots) the decode path's log-probs differ from the full forward's by a few float32 ulps of |logp| at most."""
  cfg = M.TransformerConfig(vocab_size=512, d_model=64, num_heads=4, num_kv_heads=4, d_ff=128, num_layers=2,
                            max_len=64)
  params = _params(cfg, seed=3)
  rng = np.random.default_rng(3)
  tokens = rng.integers(2, 512, (8, 32)).astype(np.int32)
  mask = (np.arange(32)[None] >= rng.integers(0, 28, (8, 1))).astype(np.int32)
  s = S.sample(params, cfg, tokens, mask, jax.random.PRNGKey(3), max_new_tokens=32, eos_id=EOS, pad_id=PAD)
  seg = np.asarray(s.sequence_mask_BxPT)
  logp = np.asarray(_forward_logprobs(cfg, params, s.sequence_BxPT, s.positions_BxPT, seg))
  full = np.take_along_axis(logp[:, 31:-1], np.asarray(s.sequence_BxPT)[:, 32:, None], axis=-1)[..., 0] * seg[:, 32:]
  diff = float(np.max(np.abs(np.asarray(s.logprobs_BxT) - full)))
  ulp = float(np.spacing(np.float32(np.max(np.abs(full)))))
  assert seg[:, 32:].sum() > 100 and np.max(np.abs(full)) > 1.0
  assert diff <= 8 * ulp, (diff, ulp)


@pytest.mark.parametrize("family", FAMILIES)
def test_top_k_one_and_tiny_top_p_equal_greedy(family):
  """Sampling with top_k=1 or top_p=1e-6 (any temperature) reproduces the argmax loop, with sampling log-prob 0."""
  cfg, params = _cfg(family), _params(_cfg(family))
  prompts = _prompts()
  refs = [_cut_at(*_greedy_reference(cfg, params, p), EOS) for p in prompts]
  tokens, mask = _pad(prompts, "left")
  for kw in (dict(top_k=1, temperature=2.0), dict(top_p=1e-6, temperature=2.0)):
    s = S.sample(params, cfg, tokens, mask, jax.random.PRNGKey(5), max_new_tokens=T, eos_id=EOS, pad_id=PAD, **kw)
    for b, (ref_tokens, ref_logps) in enumerate(refs):
      n = len(ref_tokens)
      np.testing.assert_array_equal(s.tokens_BxT[b], ref_tokens + [PAD] * (T - n))
      np.testing.assert_allclose(s.logprobs_BxT[b, :n], ref_logps, atol=1e-5)
    np.testing.assert_allclose(s.sampling_logprobs_BxT, 0.0, atol=1e-6)  # a single allowed token: log 1


def _np_filtered_probs(logits, temperature, top_k, top_p):
  """NumPy reference of temperature -> top-k -> nucleus on one logits vector."""
  z = logits / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros(len(z), bool)
  keep[order[:top_k or len(z)]] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  before = np.cumsum(p[order]) - p[order]
  keep[order[before >= top_p]] = False
  p = np.where(keep, p, 0.0)
  return p / p.sum()


@pytest.mark.parametrize("family,temperature,top_k,top_p", [
    ("gpt2", 0.7, 0, 1.0), ("llama", 1.5, 6, 1.0), ("gpt2", 1.2, 0, 0.8), ("llama", 0.9, 10, 0.7)])
def test_one_step_frequencies_match_filtered_softmax(family, temperature, top_k, top_p):
  """N copies of one prompt, one new token: empirical frequencies ~ NumPy filtered softmax (5 sigma, fixed seed)."""
  cfg, params = _cfg(family), _params(_cfg(family), seed=3)
  prompt, N = [7, 3, 12], 4000
  probs = _np_filtered_probs(_full_logprobs(cfg, params, prompt)[-1].astype(np.float64), temperature, top_k, top_p)
  s = S.sample(params, cfg, np.tile(prompt, (N, 1)), np.ones((N, 3)), jax.random.PRNGKey(6), max_new_tokens=1,
               temperature=temperature, top_k=top_k, top_p=top_p, eos_id=EOS, pad_id=PAD)
  freq = np.bincount(np.asarray(s.tokens_BxT[:, 0]), minlength=V) / N
  assert (freq[probs == 0] == 0).all()  # filtered tokens are never drawn
  assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / N) + 1e-3), (freq, probs)
  drawn = np.asarray(s.tokens_BxT[:, 0])
  np.testing.assert_allclose(s.sampling_logprobs_BxT[:, 0], np.log(probs[drawn]), atol=1e-4)


def test_temperature_is_traced_not_static():
  cfg, params = _cfg("gpt2"), _params(_cfg("gpt2"))
  tokens, mask = _pad(_prompts(), "left")
  kw = dict(max_new_tokens=3, top_k=5, eos_id=EOS, pad_id=PAD)
  S.sample(params, cfg, tokens, mask, jax.random.PRNGKey(0), temperature=0.5, **kw)
  before = S._sample_jit._cache_size()
  S.sample(params, cfg, tokens, mask, jax.random.PRNGKey(1), temperature=0.9, **kw)
  assert S._sample_jit._cache_size() == before


def test_make_sampler_over_four_devices():
  """`make_sampler(mesh)` on 4 devices (data 2 × tensor 2, params sharded): greedy rows == their argmax loops;
  sampled rows == the one-device `sample` with the same key; identical prompts draw differently."""
  assert jax.local_device_count() == 4
  cfg, params = _cfg("llama"), _params(_cfg("llama"))
  prompts = (_prompts() + _prompts(7) + _prompts(8))[:8]
  tokens, mask = _pad(prompts, "right")
  common = dict(max_new_tokens=T, eos_id=EOS, pad_id=PAD)
  mesh = parallel.make_mesh({"tensor": 2})
  specs = M.logical_axes(lambda: M.boxed_params(cfg, jax.random.PRNGKey(0)))
  sharded = parallel.shard_tree(params, parallel.param_shardings(mesh, params, specs))
  put = lambda *xs: [parallel.put_batch(mesh, x) for x in xs]
  out = S.make_sampler(mesh, cfg, greedy=True, **common)(sharded, *put(tokens, mask), jax.random.PRNGKey(0))
  mapped = parallel.to_host(out)
  assert mapped.tokens_BxT.shape == (8, T) and mapped.sequence_BxPT.shape == (8, P + T)
  for b, prompt in enumerate(prompts):
    ref_tokens, ref_logps = _cut_at(*_greedy_reference(cfg, params, prompt), EOS)
    n = len(ref_tokens)
    np.testing.assert_array_equal(mapped.tokens_BxT[b], ref_tokens + [PAD] * (T - n))
    np.testing.assert_allclose(mapped.logprobs_BxT[b, :n], ref_logps, atol=1e-5)
    assert mapped.lengths_B[b] == n
  one_tokens, one_mask = np.tile(tokens[:1], (8, 1)), np.tile(mask[:1], (8, 1))
  key = jax.random.PRNGKey(3)
  drawn = parallel.to_host(S.make_sampler(mesh, cfg, temperature=1.5, **common)(
      sharded, *put(one_tokens, one_mask), key))
  alone = S.sample(params, cfg, one_tokens, one_mask, key, temperature=1.5, **common)
  np.testing.assert_array_equal(drawn.tokens_BxT, np.asarray(alone.tokens_BxT))
  np.testing.assert_allclose(drawn.logprobs_BxT, np.asarray(alone.logprobs_BxT), atol=1e-5)
  assert len({tuple(row) for row in drawn.tokens_BxT}) > 1


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_k=41), "top_k=41"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(eos_id=40), "eos_id=40"),
])
def test_bad_options_raise_value_error(kw, match):
  cfg, params = _cfg("gpt2"), _params(_cfg("gpt2"))
  tokens, mask = _pad(_prompts(), "left")
  args = {**dict(max_new_tokens=T, eos_id=EOS, pad_id=PAD), **kw}
  with pytest.raises(ValueError, match=match):
    S.sample(params, cfg, tokens, mask, jax.random.PRNGKey(0), **args)
  with pytest.raises(ValueError, match=match):  # at construction, before any device call
    S.make_sampler(parallel.make_mesh(), cfg, **args)


def test_too_long_names_prompt_length_max_new_tokens_and_max_len():
  cfg, params = _cfg("gpt2"), _params(_cfg("gpt2"))
  tokens, mask = _pad(_prompts(), "left")
  match = r"P=6 \+ max_new_tokens=11 = 17 exceeds TransformerConfig.max_len=16"
  with pytest.raises(ValueError, match=match):
    S.sample(params, cfg, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=11, eos_id=EOS, pad_id=PAD)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  mapped = S.make_sampler(mesh, cfg, max_new_tokens=11, eos_id=EOS, pad_id=PAD)
  with pytest.raises(ValueError, match=match):  # the prompt length is known at the first (traced) call
    mapped(params, parallel.put_batch(mesh, tokens), parallel.put_batch(mesh, mask), jax.random.PRNGKey(0))


def test_bad_prompts_raise_value_error():
  cfg, params = _cfg("gpt2"), _params(_cfg("gpt2"))
  tokens, mask = _pad(_prompts(), "left")
  mask[1] = 0
  with pytest.raises(ValueError, match=r"prompt rows \[1\] have no real token"):
    S.sample(params, cfg, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=T, eos_id=EOS, pad_id=PAD)
  with pytest.raises(ValueError, match="prompt_mask_BxP shape"):
    S.sample(params, cfg, tokens, mask[:, 1:], jax.random.PRNGKey(0), max_new_tokens=T, eos_id=EOS, pad_id=PAD)


def test_decode_loop_exits_early_when_all_rows_end(monkeypatch):
  """The while_loop stops once every row has emitted EOS: only the steps up to the last EOS run."""
  cfg, params = _cfg("llama"), _params(_cfg("llama"))
  prompts = _prompts()[:1]
  ref_tokens, _ = _greedy_reference(cfg, params, prompts[0])
  eos = ref_tokens[1]
  n = ref_tokens.index(eos) + 1
  steps, emit = [], S._emit

  def counting_emit(carry, *args):
    jax.debug.callback(lambda t: steps.append(int(t)), carry["t"])
    return emit(carry, *args)

  monkeypatch.setattr(S, "_emit", counting_emit)
  S._sample_jit.clear_cache()  # retrace with the counting step (and drop it again below)
  tokens, mask = _pad(prompts, "left")
  s = S.sample(params, cfg, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=T, greedy=True, eos_id=eos,
               pad_id=PAD)
  jax.block_until_ready(s)
  S._sample_jit.clear_cache()
  assert steps == list(range(n)) and n < T
  np.testing.assert_array_equal(s.tokens_BxT[0], ref_tokens[:n] + [PAD] * (T - n))


@pytest.mark.parametrize("vocab", [5, 128, 1000])
def test_two_level_argmax_equals_argmax_ties_and_infinities(vocab):
  rng = np.random.default_rng(vocab)
  x = rng.integers(-3, 3, (64, vocab)).astype(np.float32)  # many ties: the first largest index must win
  x[0] = -np.inf  # a fully masked row -> 0, as jnp.argmax
  x[1, vocab // 2:] = np.inf
  x[2] = rng.normal(size=vocab)
  np.testing.assert_array_equal(jax.jit(S.argmax_rows)(jnp.asarray(x)), np.argmax(x, axis=-1))


def test_two_level_inverse_cdf_draw_matches_probabilities_and_skips_zeros():
  """V = 1000 (not a multiple of the 128-entry block): frequencies within 5 sigma, zero-probability entries and
  blocks never drawn, over 20000 draws of one row."""
  V_, N = 1000, 20000
  rng = np.random.default_rng(0)
  logits = rng.normal(size=V_) * 2.0
  logits[rng.random(V_) < 0.5] = -np.inf  # half the entries impossible
  logits[256:384] = -np.inf  # and one whole block
  probs = np.exp(logits - logits[np.isfinite(logits)].max())
  probs /= probs.sum()
  draws = jax.jit(S.inverse_cdf_sample)(jax.random.PRNGKey(3), jnp.tile(jnp.asarray(logits, jnp.float32), (N, 1)))
  freq = np.bincount(np.asarray(draws), minlength=V_) / N
  assert (freq[probs == 0] == 0).all()
  assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / N) + 1e-3)
