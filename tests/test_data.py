"""Data pipeline tests: a real sentencepiece model, real TFDS array_record builds over local files."""
import collections
import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlhf_jax import data, tokenizer

CORPUS = os.path.join(os.path.dirname(__file__), "testdata", "spm", "corpus.txt")
with open(CORPUS, encoding="utf-8") as _f:
  LINES = _f.read().splitlines()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer.train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("spm") / "tok"), vocab_size=512)


def _jsonl(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
  return str(path)


def _segments(row):
  """(inputs, targets, loss_mask) per segment of a packed row, checking segment ids and positions."""
  seg = row["segment_ids"]
  used = int(np.count_nonzero(seg))
  assert (seg[:used] > 0).all() and (seg[used:] == 0).all(), seg
  assert (np.diff(seg[:used]) >= 0).all() and (np.diff(seg[:used]) <= 1).all() and (used == 0 or seg[0] == 1)
  np.testing.assert_array_equal(row["loss_mask"][used:], 0)
  np.testing.assert_array_equal(row["inputs"][used:], 0)
  out = []
  for s in range(1, int(seg.max(initial=0)) + 1):
    m = seg == s
    np.testing.assert_array_equal(row["positions"][m], np.arange(m.sum()))
    out.append((tuple(row["inputs"][m]), tuple(row["targets"][m]), tuple(row["loss_mask"][m])))
  return out


def _rows(batch):
  return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["segment_ids"]))]


def _lm_chunks(tok, docs, seq_len):
  """Hand-made (inputs, targets) chunks of [bos] + ids + [eos] per document, in document order."""
  out = []
  for doc in docs:
    d = [tok.bos_id] + tok.encode(doc) + [tok.eos_id]
    out += [(tuple(d[s:s + seq_len][:len(d) - 1 - s]), tuple(d[s + 1:s + 1 + seq_len]))
            for s in range(0, len(d) - 1, seq_len)]
  return out


def _lm_docs(tmp_path):
  docs = LINES + [" ".join(LINES[:4]), "x"]  # one document many chunks long, one of two tokens
  path = tmp_path / "corpus.txt"
  path.write_text("\n".join(docs[:10]) + "\n\n" + "\n".join(docs[10:]) + "\n", encoding="utf-8")  # a blank line
  return str(path), docs


def _documents(segments, bos):
  """Splits the concatenated (inputs, targets) of consecutive segments at every bos input into documents."""
  inputs = [t for seg in segments for t in seg[0]]
  targets = [t for seg in segments for t in seg[1]]
  starts = [i for i, t in enumerate(inputs) if t == bos] + [len(inputs)]
  return [(tuple(inputs[a:b]), tuple(targets[a:b])) for a, b in zip(starts, starts[1:])]


def test_lm_packing_fills_rows_and_covers_each_document_once_per_epoch(tok, tmp_path):
  path, docs = _lm_docs(tmp_path)
  seq_len = 24
  expected = _lm_chunks(tok, docs, seq_len)
  assert max(len(c[0]) for c in expected) == seq_len and len(expected) > len(docs)  # some docs were split
  whole = collections.Counter(_documents(expected, tok.bos_id))
  assert sum(whole.values()) == len(docs)
  n_tokens = sum(len(c[0]) for c in expected)
  loader = data.make_lm_loader(path, tok, seq_len, 4, 7, str(tmp_path), local_device_count=2)
  segments = []
  while sum(len(p[0]) for p in segments) < 2 * n_tokens:
    batch = next(loader)
    assert batch["inputs"].shape == (4, seq_len) and batch["inputs"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    for row in _rows(batch):
      pieces = _segments(row)
      assert sum(len(p[0]) for p in pieces) == seq_len  # every row is full: no padding while training
      assert all(all(m == 1.0 for m in p[2]) for p in pieces)  # loss on every real target
      assert all(len(p[0]) <= seq_len for p in pieces)
      segments += pieces
  epoch0 = _documents(segments, tok.bos_id)[:len(docs)]
  epoch1 = _documents(segments, tok.bos_id)[len(docs):2 * len(docs)]
  assert collections.Counter(epoch0) == whole and collections.Counter(epoch1) == whole
  assert epoch0 != epoch1 and epoch0 != _documents(expected, tok.bos_id)  # reshuffled every epoch


def test_lm_eval_pass_is_ordered_padded_and_counts_tokens(tok, tmp_path):
  path, docs = _lm_docs(tmp_path)
  seq_len = 32
  expected = _lm_chunks(tok, docs, seq_len)
  loader = data.make_lm_loader(path, tok, seq_len, 8, 0, str(tmp_path), train=False, local_device_count=1)
  for _ in range(2):  # every iteration is the same finite pass
    batches = list(loader)
    rows = [_segments(row) for b in batches for row in _rows(b)]
    stream = [t for r in rows for p in r for t in p[0]]
    assert stream == [t for c in expected for t in c[0]]  # the documents in order, cut only at row ends
    assert [t for r in rows for p in r for t in p[1]] == [t for c in expected for t in c[1]]
    used = [sum(len(p[0]) for p in r) for r in rows]
    last = max(i for i, u in enumerate(used) if u)
    assert all(u == seq_len for u in used[:last])  # full rows until the data runs out
  assert all(b["inputs"].shape == (8, seq_len) for b in batches)
  assert (batches[-1]["segment_ids"][-1] == 0).all()  # the last batch is padded with empty rows
  assert sum(data.num_tokens(b) for b in batches) == sum(len(c[0]) for c in expected)


def _sft_records():
  recs = [{"prompt": f"Question: {LINES[i]}\n", "response": LINES[i + 1]} for i in range(0, 12, 2)]
  return recs + [{"prompt": "Sort the letters d a c b:\n", "response": " a b c d"}]


def test_sft_loss_mask_covers_exactly_the_response(tok, tmp_path):
  recs = _sft_records()
  path = _jsonl(tmp_path / "sft.jsonl", recs)
  seq_len = 128
  loader = data.make_sft_loader(path, tok, seq_len, 4, 0, str(tmp_path), train=False, local_device_count=1)
  pieces = [p for b in loader for row in _rows(b) for p in _segments(row)]
  assert len(pieces) == len(recs)
  for (inputs, targets, mask), r in zip(pieces, recs):
    p, resp = tok.encode(r["prompt"]), tok.encode(r["response"])
    full = [tok.bos_id] + p + resp + [tok.eos_id]
    assert inputs == tuple(full[:-1]) and targets == tuple(full[1:])
    assert mask == tuple([0.0] * len(p) + [1.0] * (len(resp) + 1))
  train = data.make_sft_loader(path, tok, seq_len, 4, 0, str(tmp_path), local_device_count=1)
  assert max(len(_segments(r)) for r in _rows(next(train))) > 1  # several examples share a row


def test_sft_too_long_errors_or_truncates_prompt_from_the_left(tok, tmp_path):
  recs = [{"prompt": "Hi\n", "response": "Hello."}, {"prompt": "2+2?\n", "response": "4"},
          {"prompt": " ".join(LINES[:3]) + "\n", "response": "Answer: 42."}]
  path = _jsonl(tmp_path / "sft.jsonl", recs)
  with pytest.raises(ValueError, match=re.escape(f"{path}:3:") + ".*truncate_prompt"):
    data.make_sft_loader(path, tok, 32, 2, 0, str(tmp_path), local_device_count=1)
  loader = data.make_sft_loader(path, tok, 32, 4, 0, str(tmp_path), train=False, truncate_prompt=True,
                                local_device_count=1)
  inputs, targets, mask = [p for b in loader for row in _rows(b) for p in _segments(row)][2]
  resp = tok.encode("Answer: 42.") + [tok.eos_id]
  full = [tok.bos_id] + tok.encode(recs[2]["prompt"])[-(32 - len(resp)):] + resp
  assert len(inputs) == 32 and inputs == tuple(full[:-1]) and targets == tuple(full[1:])
  assert sum(mask) == len(resp)


def test_comparison_batch_fields(tok, tmp_path):
  recs = [{"prompt": "Pick one:\n", "responses": ["red", "blue"], "ranking": [1, 0]},
          {"prompt": "Count to three:\n", "responses": ["1 2 3", "one", "1 2"], "ranking": [0, 2, 1]},
          {"prompt": "Say hi:\n", "responses": ["hi", "hello there", "hey", "yo"], "ranking": [3, 1, 0, 2]},
          {"prompt": "Is 7 prime?\n", "chosen": "Yes.", "rejected": "No."}]
  path = _jsonl(tmp_path / "cmp.jsonl", recs)
  seq_len, kmax = 20, 4
  loader = data.make_comparison_loader(path, tok, seq_len, 4, kmax, 0, str(tmp_path), train=False,
                                       local_device_count=1, pack=False)
  (batch,) = list(loader)
  assert batch["tokens"].shape == (4, kmax, seq_len) and batch["rank"].shape == (4, 1, kmax)
  batch.update({k: batch[k][:, 0] for k in ("last_idx", "rank", "valid")})  # one record per element
  for i, r in enumerate(recs):
    responses = r.get("responses", [r.get("chosen"), r.get("rejected")])
    ranking = r.get("ranking", [0, 1])
    for k in range(kmax):
      seq = [tok.bos_id] + tok.encode(r["prompt"]) + tok.encode(responses[k]) + [tok.eos_id] if k < len(
          responses) else []
      n = len(seq)
      np.testing.assert_array_equal(batch["tokens"][i, k], seq + [0] * (seq_len - n))
      np.testing.assert_array_equal(batch["segment_ids"][i, k], [1] * n + [0] * (seq_len - n))
      np.testing.assert_array_equal(batch["positions"][i, k, :n], np.arange(n))
      assert batch["valid"][i, k] == float(k < len(responses))
      assert batch["last_idx"][i, k] == (k * seq_len + n - 1 if n else 0)  # flat slot in the element
      assert batch["rank"][i, k] == (ranking.index(k) if k < len(responses) else -1)
  bad = _jsonl(tmp_path / "k5.jsonl", recs[:1] + [{"prompt": "p", "responses": list("abcde"),
                                                   "ranking": [0, 1, 2, 3, 4]}])
  with pytest.raises(ValueError, match=re.escape(f"{bad}:2:") + ".*5 responses.*max_responses=4"):
    data.make_comparison_loader(bad, tok, seq_len, 2, kmax, 0, str(tmp_path), local_device_count=1)


def _comparison_records(n=15):
  """n ranked comparisons with 2-4 responses of different lengths (9-24 tokens each with the test tokenizer)."""
  words = " ".join(LINES).split()
  rng = np.random.default_rng(0)
  recs = []
  for i in range(n):
    k = 2 + i % 3
    responses = [" ".join(words[(7 * i + 3 * j) % len(words):][:1 + (i + j) % 4]) for j in range(k)]
    recs.append({"prompt": f"Q{i}: {words[i]}\n", "responses": responses, "ranking": rng.permutation(k).tolist()})
  return recs


def _packed_records(tok, batch, seq_len):
  """[(tokens of each sequence in response order, ranks)] of every record slot of a packed comparison batch, read
  back through last_idx: the segment that holds the slot, which must end there and count positions from 0."""
  out = []
  for e in range(batch["tokens"].shape[0]):
    for r in range(batch["rank"].shape[1]):
      seqs, ranks = [], []
      for k in np.flatnonzero(batch["valid"][e, r]):
        row, col = divmod(int(batch["last_idx"][e, r, k]), seq_len)
        seg = batch["segment_ids"][e, row]
        m = seg == seg[col]
        assert seg[col] > 0 and np.flatnonzero(m)[-1] == col
        np.testing.assert_array_equal(batch["positions"][e, row][m], np.arange(m.sum()))
        seqs.append(tuple(batch["tokens"][e, row][m]))
        ranks.append(int(batch["rank"][e, r, k]))
      if batch["valid"][e].any():  # (not an eval pass's padding element, which is all zeros)
        assert (batch["rank"][e, r][batch["valid"][e, r] == 0] == -1).all()
      if seqs:
        out.append((seqs, ranks))
  return out


def test_packed_comparisons_hold_whole_records_once_each(tok, tmp_path):
  recs, seq_len, kmax = _comparison_records(), 48, 4
  path = _jsonl(tmp_path / "cmp.jsonl", recs)
  loader = data.make_comparison_loader(path, tok, seq_len, 2, kmax, 0, str(tmp_path), train=False,
                                       local_device_count=1, max_records=4)
  batches = list(loader)
  assert batches[0]["tokens"].shape == (2, kmax, seq_len) and batches[0]["rank"].shape == (2, 4, kmax)
  got = [x for b in batches for x in _packed_records(tok, b, seq_len)]
  want = []
  for r in recs:
    seqs = [tuple([tok.bos_id] + tok.encode(r["prompt"]) + tok.encode(x) + [tok.eos_id]) for x in r["responses"]]
    want.append((seqs, [r["ranking"].index(k) for k in range(len(seqs))]))
  assert got == want  # every record once, in order, whole, each sequence ending at its last_idx
  elements = sum(int(b["valid"].any(axis=(1, 2)).sum()) for b in batches)
  assert elements < len(recs) / 2  # packed: more than two records per element on average
  slots = sum(int(np.count_nonzero(b["segment_ids"])) for b in batches)
  assert slots == sum(len(s) for seqs, _ in want for s in seqs)  # nothing but the sequences occupies slots


def test_packed_comparison_stream_resumes_and_shards_over_hosts(tok, tmp_path):
  path = _jsonl(tmp_path / "cmp.jsonl", _comparison_records())
  make = lambda i=0, n=1: data.make_comparison_loader(path, tok, 48, 4, 4, 3, str(tmp_path), i, n,
                                                      local_device_count=1, max_records=4)
  a, hosts = make(), [make(0, 2), make(1, 2)]
  for _ in range(3):
    want = next(a)
    got = [next(h) for h in hosts]
    for k in want:
      np.testing.assert_array_equal(np.concatenate([got[0][k], got[1][k]]), want[k])
  state = json.loads(json.dumps(a.get_state()))
  rest = [next(a) for _ in range(8)]  # past the end of the epoch (15 records, about 3 per element)
  assert a.get_state()["epoch"] >= 1
  b = make()
  b.set_state(state)
  for x, y in zip(rest, [next(b) for _ in range(8)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_packed_reward_loss_and_grads_equal_the_padded_layout(tok, tmp_path):
  import functools
  import jax
  from rlhf_jax import losses, stages
  from rlhf_jax.model import TransformerConfig
  cfg = TransformerConfig(vocab_size=512, d_model=32, num_heads=2, num_kv_heads=2, d_ff=64, num_layers=2, max_len=48)
  params = stages.fresh_reward_params(cfg, jax.random.PRNGKey(0))
  recs = _comparison_records()
  path = _jsonl(tmp_path / "cmp.jsonl", recs)
  step = jax.jit(jax.value_and_grad(lambda p, b: losses.reward_loss(p, b, None, cfg=cfg), has_aux=True))

  def total(pack):  # summed loss, pair count and gradient of the loss sum over one pass
    loader = data.make_comparison_loader(path, tok, 48, 4, 4, 0, str(tmp_path), train=False, local_device_count=1,
                                         pack=pack, max_records=4)
    out = [step(params, b) for b in loader]
    grads = jax.tree.map(lambda *g: np.sum(g, axis=0), *[g for _, g in out])
    return sum(float(l) for (l, _), _ in out), sum(float(a["loss"][1]) for (_, a), _ in out), grads, len(out)

  packed, padded = total(True), total(False)
  assert packed[3] < padded[3]  # fewer batches for the same records
  # reference: each sequence alone in its own right-padded row, then −log σ(s_w − s_l) over the ranked pairs
  seqs = [[tok.bos_id] + tok.encode(r["prompt"]) + tok.encode(x) + [tok.eos_id] for r in recs for x in r["responses"]]
  rows = np.array([s + [0] * (48 - len(s)) for s in seqs], np.int32)
  scores = np.asarray(jax.jit(functools.partial(losses.sequence_scores, cfg=cfg))(
      params, rows, np.tile(np.arange(48), (len(seqs), 1)),
      (rows != 0).astype(np.int32) * (np.arange(48) < np.array([len(s) for s in seqs])[:, None]),
      np.array([len(s) - 1 for s in seqs])), np.float64)
  want, pairs, at = 0.0, 0, 0
  for r in recs:
    s, rank = scores[at:at + len(r["responses"])], [r["ranking"].index(k) for k in range(len(r["responses"]))]
    at += len(rank)
    for i in range(len(rank)):
      for j in range(len(rank)):
        if rank[i] < rank[j]:
          want, pairs = want + np.log1p(np.exp(-(s[i] - s[j]))), pairs + 1
  assert packed[1] == padded[1] == pairs == 5 * (1 + 3 + 6)
  assert abs(packed[0] - want) < 1e-5 * want and abs(padded[0] - want) < 1e-5 * want, (packed[0], padded[0], want)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(padded[2]))
  assert scale > 1e-2
  for a, b in zip(jax.tree.leaves(packed[2]), jax.tree.leaves(padded[2])):
    np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0)


def test_prompts_left_padded_and_eval_slices_per_host(tok, tmp_path):
  prompts = [f"Question: {line}\n" for line in LINES[:10]]
  path = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
  P = 64
  per_host = []
  for host in range(2):
    loader = data.make_prompt_loader(path, tok, P, 4, 0, str(tmp_path), host, 2, train=False,
                                     local_device_count=2)
    per_host.append(list(loader))
  assert len(per_host[0]) == len(per_host[1]) == 3  # ceil(10 / 4) global batches on both hosts
  for host in range(2):
    for b, batch in enumerate(per_host[host]):
      for j in range(2):
        i = 4 * b + 2 * host + j  # global row of this host's slot
        if i >= len(prompts):
          assert batch["prompts"][j] == "" and (batch["prompt_mask"][j] == 0).all()
          continue
        ids = [tok.bos_id] + tok.encode(prompts[i])
        assert batch["prompts"][j] == prompts[i]
        np.testing.assert_array_equal(batch["prompt_tokens"][j], [0] * (P - len(ids)) + ids)
        np.testing.assert_array_equal(batch["prompt_mask"][j], [0] * (P - len(ids)) + [1] * len(ids))
  with pytest.raises(ValueError, match=re.escape(f"{path}:1:") + ".*prompt_len=5"):
    data.make_prompt_loader(path, tok, 5, 4, 0, str(tmp_path), local_device_count=1)
  short = data.make_prompt_loader(path, tok, 5, 4, 0, str(tmp_path), train=False, truncate_prompt=True,
                                  local_device_count=1)
  np.testing.assert_array_equal(next(iter(short))["prompt_tokens"][0], [tok.bos_id] + tok.encode(prompts[0])[-4:])


def test_training_hosts_take_disjoint_slices_of_the_same_global_batch(tok, tmp_path):
  prompts = [f"p{i}: {line}\n" for i, line in enumerate(LINES[:10])]
  path = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
  one = data.make_prompt_loader(path, tok, 64, 4, 3, str(tmp_path), 0, 1, local_device_count=1)
  hosts = [data.make_prompt_loader(path, tok, 64, 4, 3, str(tmp_path), h, 2, local_device_count=1)
           for h in range(2)]
  seen = [[], []]
  for _ in range(5):  # 5 global batches of 4 = two epochs of 10 prompts
    want = next(one)["prompts"]
    got = [next(h)["prompts"] for h in hosts]
    assert got[0] + got[1] == want  # host h holds rows [2h, 2h + 2) of the global batch
    for h in range(2):
      seen[h] += got[h]
  assert set(seen[0]) | set(seen[1]) == set(prompts)  # every record reaches some host
  assert hosts[0].get_state() == hosts[1].get_state() == one.get_state()  # one state resumes every host
  assert one.get_state()["epoch"] == 2 and one.get_state()["records"] == 10


def test_resume_from_state_equals_uninterrupted_stream(tok, tmp_path):
  path, _ = _lm_docs(tmp_path)
  make = lambda seed: data.make_lm_loader(path, tok, 8, 4, seed, str(tmp_path), local_device_count=1)
  a = make(5)
  while a.get_state()["chunk"] == 0:  # stop in the middle of a document
    next(a)
  state = json.loads(json.dumps(a.get_state()))
  assert all(isinstance(v, int) for v in state.values())
  rest = [next(a) for _ in range(60)]  # runs past the epoch boundary
  assert a.get_state()["epoch"] >= 1
  b = make(5)
  b.set_state(state)
  for x, y in zip(rest, [next(b) for _ in range(60)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  c, d = make(5), make(6)
  assert not all(np.array_equal(next(c)["inputs"], next(d)["inputs"]) for _ in range(3))
  with pytest.raises(ValueError, match="does not fit this data"):
    b.set_state({**state, "records": state["records"] + 1})


def test_batch_size_checks(tok, tmp_path):
  path = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a\n"}, {"prompt": "b\n"}])
  with pytest.raises(ValueError, match=r"data\.batch_size=6 gives 6 rows per host, not divisible by the host.s batch shards \(4: mesh\.data × mesh\.fsdp"):
    data.make_lm_loader(CORPUS, tok, 8, 6, 0, str(tmp_path), local_device_count=4)
  with pytest.raises(ValueError, match=r"ppo\.batch_size=6 gives 6 rows.*batch shards \(4:"):  # default: jax's local devices
    data.make_prompt_loader(path, tok, 8, 6, 0, str(tmp_path))
  with pytest.raises(ValueError, match=r"rm\.batch=3 must be a positive multiple of process_count=2"):
    data.make_comparison_loader(path, tok, 8, 3, 2, 0, str(tmp_path), 0, 2, batch_field="rm.batch")


_LOADERS = {
    "text": lambda p, tok, wd: data.make_lm_loader(p, tok, 16, 2, 0, wd, local_device_count=1),
    "sft": lambda p, tok, wd: data.make_sft_loader(p, tok, 16, 2, 0, wd, local_device_count=1),
    "comparison": lambda p, tok, wd: data.make_comparison_loader(p, tok, 16, 2, 4, 0, wd, local_device_count=1),
    "prompt": lambda p, tok, wd: data.make_prompt_loader(p, tok, 16, 2, 0, wd, local_device_count=1),
}
_GOOD = {"text": {"text": "a b"}, "sft": {"prompt": "a", "response": "b"}, "prompt": {"prompt": "a"},
         "comparison": {"prompt": "a", "chosen": "b", "rejected": "c"}}


@pytest.mark.parametrize("kind,line,message", [
    ("sft", '{"prompt": "a", "response": ', "bad JSON"),
    ("sft", '[1, 2]', "expected a JSON object"),
    ("sft", '{"prompt": "a"}', "missing field 'response'"),
    ("sft", '{"prompt": "a", "response": 5}', "'response' must be a string"),
    ("sft", '{"prompt": " ", "response": "b"}', "'prompt' is empty"),
    ("prompt", '{"prompt": ["a"]}', "'prompt' must be a string"),
    ("text", '{"txt": "a"}', "missing field 'text'"),
    ("comparison", '{"prompt": "a", "responses": ["x"], "ranking": [0]}', "K >= 2"),
    ("comparison", '{"prompt": "a", "responses": ["x", "y"], "ranking": [0, 0]}', "not a permutation"),
    ("comparison", '{"prompt": "a", "responses": ["x", "y"], "ranking": [1, 2]}', "not a permutation"),
    ("comparison", '{"prompt": "a", "responses": ["x", "y"], "ranking": [true, false]}', "list of integers"),
    ("comparison", '{"prompt": "a", "responses": ["x", ""], "ranking": [0, 1]}', r"'responses\[1\]' is empty"),
    ("comparison", '{"prompt": "a", "chosen": "x"}', "missing field 'rejected'"),
    ("comparison", '{"prompt": "a", "responses": "xy", "ranking": [0, 1]}', "list of strings"),
])
def test_bad_records_name_file_and_line(tok, tmp_path, kind, line, message):
  path = _jsonl(tmp_path / "bad.jsonl", [_GOOD[kind], line])
  with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*" + message):
    _LOADERS[kind](path, tok, str(tmp_path))


def test_missing_empty_and_undecodable_files(tok, tmp_path):
  with pytest.raises(ValueError, match="nope.jsonl"):
    _LOADERS["sft"](str(tmp_path / "nope.jsonl"), tok, str(tmp_path))
  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty.jsonl")) + ".*no records"):
    _LOADERS["prompt"](str(tmp_path / "empty.jsonl"), tok, str(tmp_path))
  (tmp_path / "bytes.txt").write_bytes(b"fine\n\xff\xfe bad\n")
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "bytes.txt")) + ":2: not valid UTF-8"):
    _LOADERS["text"](str(tmp_path / "bytes.txt"), tok, str(tmp_path))
  with pytest.raises(ValueError, match="must be a .jsonl file"):
    _LOADERS["sft"](str(tmp_path / "bytes.txt"), tok, str(tmp_path))


def test_cache_is_keyed_by_content(tok, tmp_path):
  path = tmp_path / "prompts.jsonl"
  first = lambda: next(iter(data.make_prompt_loader(str(path), tok, 16, 1, 0, str(tmp_path), train=False,
                                                    local_device_count=1)))["prompts"][0]
  _jsonl(path, [{"prompt": "old\n"}])
  assert first() == "old\n"
  _jsonl(path, [{"prompt": "new\n"}])
  assert first() == "new\n"
  _jsonl(path, [{"prompt": "old\n"}])
  assert first() == "old\n"
  assert len(os.listdir(tmp_path / "tfds")) == 2  # the first build was reused


class RlhfJaxToySentences(tfds.core.GeneratorBasedBuilder):
  """A registered TFDS dataset generated locally (no download), read by name like "tfds:lm1b"."""
  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"sentence": tfds.features.Text()}), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(LINES[:6]), "test": self._generate_examples(LINES[6:9])}

  def _generate_examples(self, lines):
    for i, line in enumerate(lines):
      yield i, {"sentence": line}


def test_registered_tfds_dataset_by_name(tok, tmp_path):
  tfds_dir = str(tmp_path / "tfds_data")
  loader = data.make_lm_loader("tfds:rlhf_jax_toy_sentences", tok, 64, 4, 0, str(tmp_path), train=False,
                               split="test", text_key="sentence", tfds_data_dir=tfds_dir, local_device_count=1)
  pieces = [p[:2] for b in loader for row in _rows(b) for p in _segments(row)]
  assert pieces == _lm_chunks(tok, LINES[6:9], 64)
  with pytest.raises(ValueError, match=re.escape("tfds:rlhf_jax_toy_sentences[0]: missing field 'text'")):
    data.make_lm_loader("tfds:rlhf_jax_toy_sentences", tok, 64, 4, 0, str(tmp_path), tfds_data_dir=tfds_dir,
                        local_device_count=1)
  with pytest.raises(ValueError, match="tfds:no_such_dataset_xyz: no registered TFDS dataset"):
    data.make_lm_loader("tfds:no_such_dataset_xyz", tok, 64, 4, 0, str(tmp_path), tfds_data_dir=tfds_dir,
                        local_device_count=1)


def test_local_records_leave_nothing_in_the_system_temp_dir(tmp_path, monkeypatch):
  """TFDS 4.9 makes an empty `tmp*tfds` folder per builder while looking for bucket metadata; ours skips that."""
  import tempfile
  from rlhf_jax import records
  system_tmp = tmp_path / "system_tmp"
  system_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
  path = tmp_path / "a.txt"
  path.write_text("one document\nanother document\n")
  for _ in range(2):  # build, then reuse the prepared folder
    assert len(records.Records([str(path)], "text", str(tmp_path / "work"))) == 2
  assert os.listdir(system_tmp) == []


def _lone_forwards(backbone, cfg, seqs):
  """(logits_NxLxV, h_NxLxD) of each sequence alone in its own right-padded row of cfg.max_len (positions from 0,
  segment 1 on its tokens; causal, so the pad slots after it change nothing), one jitted forward for all rows."""
  import jax
  from rlhf_jax.model import Transformer
  L = cfg.max_len
  rows = np.array([s + [0] * (L - len(s)) for s in seqs], np.int32)
  seg = (np.arange(L) < np.array([len(s) for s in seqs])[:, None]).astype(np.int32)
  fwd = jax.jit(lambda p, t, s: Transformer(cfg).apply({"params": p}, t, np.tile(np.arange(L), (len(seqs), 1)), s))
  return tuple(np.asarray(x, np.float64) for x in fwd(backbone, rows, seg))


def _next_token_nll(logits_LxV, seq):
  """−log softmax(logits)[next token] at each slot t < len(seq) − 1 (float64)."""
  z = logits_LxV[:len(seq) - 1]
  z = z - z.max(-1, keepdims=True)
  return np.log(np.exp(z).sum(-1)) - z[np.arange(len(seq) - 1), seq[1:]]


def test_reward_lm_term_is_the_next_token_loss_of_each_best_response(tok, tmp_path):
  """reward_loss(lm_coef=c): aux lm_loss sums the next-token loss over each record's best response (+ eos), as a
  lone forward of that sequence gives it; the total is the pair loss + c × that token mean × pairs."""
  import functools
  import jax
  from rlhf_jax import losses, stages
  from rlhf_jax.model import TransformerConfig
  cfg = TransformerConfig(vocab_size=512, d_model=32, num_heads=2, num_kv_heads=2, d_ff=64, num_layers=2, max_len=48)
  params = stages.fresh_reward_params(cfg, jax.random.PRNGKey(1))
  recs = _comparison_records()
  loader = data.make_comparison_loader(_jsonl(tmp_path / "cmp.jsonl", recs), tok, 48, 4, 4, 0, str(tmp_path),
                                       train=False, local_device_count=1, max_records=4)
  loss = {c: jax.jit(functools.partial(losses.reward_loss, rng=None, cfg=cfg, lm_coef=c)) for c in (0.0, 0.5)}
  got_sum = got_n = 0.0
  for b in loader:
    plain, _ = loss[0.0](params, b)
    total, aux = loss[0.5](params, b)
    (lm_sum, lm_n), pairs = aux["lm_loss"], aux["loss"][1]
    np.testing.assert_allclose(total, plain + 0.5 * lm_sum / lm_n * pairs, rtol=1e-5)
    got_sum, got_n = got_sum + float(lm_sum), got_n + float(lm_n)
  prompts = [[tok.bos_id] + tok.encode(r["prompt"]) for r in recs]
  seqs = [p + tok.encode(r["responses"][r["ranking"][0]]) + [tok.eos_id] for p, r in zip(prompts, recs)]
  logits, _ = _lone_forwards(params["backbone"], cfg, seqs)
  want_sum = sum(float(np.sum(_next_token_nll(z, s)[len(p) - 1:])) for z, s, p in zip(logits, seqs, prompts))
  want_n = sum(len(s) - len(p) for s, p in zip(seqs, prompts))
  assert got_n == want_n
  np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)


def test_rm_likelihood_feature_and_token_head_packed_and_ppo_layouts_match_lone_forwards(tok, tmp_path):
  """An RM with "loglik" and "token_head" scores head(h_last) + a · Σ log π_backbone(response + eos | prompt)
  + Σ u(h_t) over the response + eos slots, the same packed (training, score_texts) and in PPO's left-padded
  prompt | response layout (sequence_scores + response mask)."""
  import functools
  import jax
  from rlhf_jax import losses, stages
  from rlhf_jax.model import ScalarHead, TransformerConfig
  cfg = TransformerConfig(vocab_size=512, d_model=32, num_heads=2, num_kv_heads=2, d_ff=64, num_layers=2, max_len=64)
  params = stages.fresh_reward_params(cfg, jax.random.PRNGKey(2), loglik=True, token_head=True)
  assert not np.any(params["token_head"]["dense"]["kernel"])  # starts as the plain RM
  params = {**params, "loglik": np.float32(0.7), "token_head": stages.fresh_reward_params(
      cfg, jax.random.PRNGKey(3))["head"]}
  recs = _comparison_records()
  keys = [(r["prompt"], x) for r in recs for x in r["responses"]]
  plens = [1 + len(tok.encode(p)) for p, _ in keys]
  seqs = [[tok.bos_id] + tok.encode(p) + tok.encode(x) + [tok.eos_id] for p, x in keys]
  logits, h = _lone_forwards(params["backbone"], cfg, seqs)
  head = lambda p, h_NxD: np.asarray(ScalarHead(cfg).apply({"params": p}, h_NxD), np.float64)
  at_eos = head(params["head"], h[np.arange(len(seqs)), [len(s) - 1 for s in seqs]])  # h at each sequence's eos
  per_token = head(params["token_head"], h)
  want = {k: float(at_eos[i]) - 0.7 * float(np.sum(_next_token_nll(logits[i], s)[n - 1:]))
          + float(np.sum(per_token[i, n:len(s)])) for i, (k, s, n) in enumerate(zip(keys, seqs, plens))}
  prompts = [r["prompt"] for r in recs for _ in r["responses"]]
  responses = [x for r in recs for x in r["responses"]]
  got = stages.score_texts(params, cfg, tok, prompts, responses, 48, batch_size=8)
  np.testing.assert_allclose(got, [want[k] for k in zip(prompts, responses)], rtol=1e-4, atol=1e-4)
  # PPO's layout: prompt left-padded to P slots, response in the last T slots
  pairs = [([tok.bos_id] + tok.encode(p), tok.encode(x) + [tok.eos_id]) for p, x in zip(prompts, responses)]
  P, T = max(len(pr) for pr, _ in pairs) + 2, max(len(resp) for _, resp in pairs) + 2
  rows, pos, seg, last, pred = [], [], [], [], []
  for pr, resp in pairs:
    row = [tok.pad_id] * (P - len(pr)) + pr + resp + [tok.pad_id] * (T - len(resp))
    m = [0] * (P - len(pr)) + [1] * (len(pr) + len(resp)) + [0] * (T - len(resp))
    rows.append(row), seg.append(m), pos.append(list(np.maximum(np.cumsum(m) - 1, 0)))
    last.append(P + len(resp) - 1), pred.append([0] * (P - 1) + [1] * len(resp) + [0] * (T - len(resp) + 1))
  scores = jax.jit(functools.partial(losses.sequence_scores, cfg=cfg))
  ppo_scores = scores(params, np.array(rows, np.int32), np.array(pos, np.int32), np.array(seg, np.int32),
                      np.array(last, np.int32), np.array(pred, np.float32))
  np.testing.assert_allclose(ppo_scores, got, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="likelihood feature or token head"):
    scores(params, np.array(rows, np.int32), np.array(pos, np.int32), np.array(seg, np.int32),
           np.array(last, np.int32))
