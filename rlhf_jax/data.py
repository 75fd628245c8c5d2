"""Local files or a registered TFDS dataset -> host-local numpy batches for every stage.

Sources: plain text (one document per line) or JSONL `{"text"}` for pretraining; JSONL `{"prompt","response"}`
for SFT; JSONL `{"prompt","responses","ranking"}` (ranking = indices, best first) or `{"prompt","chosen",
"rejected"}` for the reward model; JSONL `{"prompt"}` for RL. Local files are validated (bad record ->
ValueError "path:line: message") and written once into an array_record TFDS dataset under
`workdir/tfds/<kind>-<content hash>`, read back with random access. `"tfds:NAME"` reads a registered TFDS
dataset (prepared in array_record format under `tfds_data_dir`) with the same record fields (`text_key` for text).

Batches (numpy, int32 tokens, float32 masks), B = batch_size / process_count rows on each host:
  packed LM / SFT   inputs, targets, positions, segment_ids (1.. per document, 0 = pad), loss_mask  (B, L)
  comparisons       tokens, segment_ids, positions (B, Kmax, L): whole records packed into Kmax rows per element;
                    last_idx (flat slot in the element's Kmax·L), rank (0 best, -1 pad), valid (B, R, Kmax)
  RL prompts        prompt_tokens, prompt_mask (B, P), left-padded [bos] + prompt; prompts: list of strings
Training loaders iterate forever: each epoch shuffles the records with (seed, epoch); every host builds the
same global rows and keeps its slice of each global batch (the global batch does not depend on the number of
hosts; each host tokenizes all records). Documents are tokenized, framed as [bos] + ids + [eos] ([bos] only when
the tokenizer adds one, `tok.bos_prefix`; prompts via `tok.prompt_parts`, the chat template when asked), shifted into
(inputs, targets), cut into chunks of at most L and packed into rows: pretraining text fills every row (a
chunk is cut at the row's end and continues in the next row as a new segment); SFT examples are never cut
(next-fit); comparison records are never split either: an element of Kmax rows takes whole records next-fit,
their sequences first-fit in its rows (each scored at its last token; pairs only within a record).
`get_state()` ({epoch, position, chunk, offset, records}) names the next token to place; `set_state` resumes
the exact stream. Eval loaders (`train=False`) make one unshuffled pass; every host builds the same global
batches and takes its slice, so all hosts yield the same number of batches; the last is padded with empty rows
(all masks zero).
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

# Records and their validators live in records.py; re-exported because data is where users look for them.
from rlhf_jax.records import KINDS, LocalRecords, Records, read_jsonl, read_records, validate_record  # noqa: F401
from rlhf_jax.tokenizer import BaseTokenizer as Tokenizer

# ------------------------------------------------------------------------------------------- examples


def _fit_prompt(prompt_ids: list[int], extra: int, limit: int, truncate: bool, where: str, what: str):
  """`prompt_ids`, cut from the left when allowed, so that len + extra <= limit; else ValueError naming `where`."""
  if len(prompt_ids) + extra <= limit:
    return prompt_ids
  keep = limit - extra
  if truncate and keep > 0:
    return prompt_ids[-keep:]
  hint = "even with the prompt truncated" if truncate else "(truncate_prompt=True cuts the prompt from the left)"
  raise ValueError(f"{where}: {len(prompt_ids) + extra} tokens (prompt {len(prompt_ids)} + {extra} more) exceed "
                   f"{what} {hint}")


def _shifted(seq: list[int], loss_from: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, targets, loss_mask) of a framed sequence; the mask is 1 where the target index >= loss_from."""
  seq = np.asarray(seq, np.int32)
  mask = (np.arange(1, len(seq)) >= loss_from).astype(np.float32)
  return seq[:-1], seq[1:], mask


def lm_pieces(record: dict, tok: Tokenizer, seq_len: int) -> list:
  """[bos] + text + [eos] shifted into (inputs, targets, loss_mask) chunks of at most seq_len."""
  inputs, targets, mask = _shifted(tok.bos_prefix + tok.encode(record["text"]) + [tok.eos_id], 1)
  return [(inputs[s:s + seq_len], targets[s:s + seq_len], mask[s:s + seq_len])
          for s in range(0, len(inputs), seq_len)]


def sft_pieces(record: dict, tok: Tokenizer, seq_len: int, truncate: bool = False) -> list:
  """[bos] + prompt + response + [eos] shifted; loss_mask = 1 where the target is a response token or eos."""
  response = tok.encode(record["response"]) + [tok.eos_id]
  head, body = tok.prompt_parts(record["prompt"])
  prompt = head + _fit_prompt(body, len(head) + len(response), seq_len + 1, truncate, record["origin"],
                              f"seq_len={seq_len} (at most {seq_len + 1} before the input/target shift)")
  return [_shifted(prompt + response, len(prompt))]


def comparison_pieces(record: dict, tok: Tokenizer, seq_len: int, max_responses: int,
                      truncate: bool = False) -> list:
  """One piece: the record's K sequences [bos] + prompt + response + [eos] (each <= seq_len) and their ranks."""
  k = len(record["responses"])
  if k > max_responses:
    raise ValueError(f"{record['origin']}: {k} responses but max_responses={max_responses} (config "
                     f"data.max_responses: raise it to the most responses a record has)")
  responses = [tok.encode(r) + [tok.eos_id] for r in record["responses"]]
  head, body = tok.prompt_parts(record["prompt"])
  prompt = head + _fit_prompt(body, len(head) + max(map(len, responses)), seq_len, truncate, record["origin"],
                              f"seq_len={seq_len}")
  rank = np.zeros(k, np.int32)
  rank[np.asarray(record["ranking"])] = np.arange(k)
  return [{"sequences": [np.asarray(prompt + r, np.int32) for r in responses], "rank": rank,
           "prompt_len": len(prompt)}]


def place_comparisons(pieces: Sequence[dict], seq_len: int, max_responses: int, max_records: int,
                      packed: bool = True) -> list | None:
  """(row, start) of every sequence of `pieces` in one element of max_responses rows × seq_len, or None if they do
  not fit. Packed: first fit, in order, at most max_records records. Unpacked: one record, sequence i in row i."""
  if len(pieces) > (max_records if packed else 1):
    return None
  if not packed:
    return [(i, 0) for i in range(len(pieces[0]["sequences"]))] if pieces else []
  used, places = [0] * max_responses, []
  for piece in pieces:
    for seq in piece["sequences"]:
      row = next((r for r in range(max_responses) if used[r] + len(seq) <= seq_len), None)
      if row is None:
        return None
      places.append((row, used[row]))
      used[row] += len(seq)
  return places


def pack_comparisons(pieces: Sequence[dict], seq_len: int, max_responses: int, max_records: int, pad_id: int,
                     packed: bool = True) -> dict:
  """One element: the records' sequences placed by `place_comparisons` in max_responses rows of seq_len slots
  (segment ids 1.. per row, positions restarting), and per record slot r and response k: last_idx (the flat slot
  row · seq_len + column of the sequence's last token), rank (0 best, -1 none) and valid; best_mask marks the
  slots whose next token is a response token (or eos) of a record's best-ranked response, response_idx the
  flat index r · max_responses + k + 1 of the sequence whose response token (or eos) a slot predicts (0: none)."""
  places = place_comparisons(pieces, seq_len, max_responses, max_records, packed)
  if places is None:
    raise ValueError(f"pack_comparisons: {len(pieces)} records do not fit {max_responses} rows x {seq_len} "
                     f"(max_records={max_records}, packed={packed})")
  K, R = max_responses, max_records if packed else 1
  el = {"tokens": np.full((K, seq_len), pad_id, np.int32), "segment_ids": np.zeros((K, seq_len), np.int32),
        "positions": np.zeros((K, seq_len), np.int32), "last_idx": np.zeros((R, K), np.int32),
        "rank": np.full((R, K), -1, np.int32), "valid": np.zeros((R, K), np.float32),
        "best_mask": np.zeros((K, seq_len), np.float32), "response_idx": np.zeros((K, seq_len), np.int32)}
  at = iter(places)
  for r, piece in enumerate(pieces):
    el["rank"][r, :len(piece["rank"])] = piece["rank"]
    for name, values_K in piece.get("values", {}).items():  # per-response values of the record (make_*_loader)
      el.setdefault(name, np.zeros((R, K), np.float32))[r, :len(values_K)] = values_K
    for k, seq in enumerate(piece["sequences"]):
      row, start = next(at)
      span = slice(start, start + len(seq))
      el["tokens"][row, span], el["positions"][row, span] = seq, np.arange(len(seq))
      el["segment_ids"][row, span] = el["segment_ids"][row].max() + 1
      el["last_idx"][r, k], el["valid"][r, k] = row * seq_len + start + len(seq) - 1, 1.0
      predicting = slice(start + piece["prompt_len"] - 1, start + len(seq) - 1)  # slots whose next token is y_t
      el["response_idx"][row, predicting] = r * K + k + 1
      if piece["rank"][k] == 0:
        el["best_mask"][row, predicting] = 1.0
  return el


def prompt_pieces(record: dict, tok: Tokenizer, prompt_len: int, truncate: bool = False) -> list:
  """One row: [bos] + prompt left-padded to prompt_len, its mask, and the prompt string."""
  head, body = tok.prompt_parts(record["prompt"])
  ids = head + _fit_prompt(body, len(head), prompt_len, truncate, record["origin"], f"prompt_len={prompt_len}")
  tokens = np.full(prompt_len, tok.pad_id, np.int32)
  mask = np.zeros(prompt_len, np.float32)
  tokens[prompt_len - len(ids):], mask[prompt_len - len(ids):] = ids, 1.0
  return [{"prompt_tokens": tokens, "prompt_mask": mask, "prompts": record["prompt"]}]


def pack(pieces: Sequence[tuple], seq_len: int, pad_id: int) -> dict:
  """One packed row from (inputs, targets, loss_mask) pieces whose lengths sum to <= seq_len."""
  row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
  row["inputs"][:], row["targets"][:] = pad_id, pad_id
  row["loss_mask"] = np.zeros(seq_len, np.float32)
  at = 0
  for segment, (inputs, targets, mask) in enumerate(pieces, 1):
    span = slice(at, at + len(inputs))
    row["inputs"][span], row["targets"][span], row["loss_mask"][span] = inputs, targets, mask
    row["positions"][span], row["segment_ids"][span] = np.arange(len(inputs)), segment
    at += len(inputs)
  return row


def num_tokens(batch: dict) -> int:
  """Non-pad token positions in a batch (each packed position has a target); loss tokens are loss_mask.sum()."""
  if "prompt_mask" in batch:
    return int(np.sum(batch["prompt_mask"]))
  return int(np.count_nonzero(batch["segment_ids"]))


def _collate(rows: Sequence[dict]) -> dict:
  return {k: np.stack([r[k] for r in rows]) if isinstance(v, np.ndarray) else [r[k] for r in rows]
          for k, v in rows[0].items()}


def _empty_like(row: dict) -> dict:
  return {k: np.zeros_like(v) if isinstance(v, np.ndarray) else type(v)() for k, v in row.items()}


# ------------------------------------------------------------------------------------------- loaders


class _Stream:
  """Rows from records in a per-epoch order; (epoch, position, chunk) names the next piece to place."""

  def __init__(self, records: Records, order_fn: Callable[[int], np.ndarray], pieces_fn: Callable,
               pack_fn: Callable | None, seq_len: int, finite: bool, split: bool = False,
               fits_fn: Callable[[list], bool] | None = None):
    self.records, self.order_fn, self.pieces_fn, self.pack_fn = records, order_fn, pieces_fn, pack_fn
    self.seq_len, self.finite, self.split, self.fits_fn = seq_len, finite, split, fits_fn
    self.epoch = self.position = self.chunk = self.offset = 0
    self._order_epoch, self._cache_key = None, None

  def _pieces(self) -> list:
    if self._order_epoch != self.epoch:
      self._order, self._order_epoch = self.order_fn(self.epoch), self.epoch
    key = (self.epoch, self.position)
    if self._cache_key != key:
      self._cache, self._cache_key = self.pieces_fn(self.records[self._order[self.position]]), key
    return self._cache

  def _advance(self, num_pieces: int) -> None:
    self.chunk += 1
    if self.chunk == num_pieces:
      self.chunk, self.position = 0, self.position + 1
      if self.position == len(self._order):
        self.position, self.epoch = 0, self.epoch + 1

  def done(self) -> bool:
    return self.finite and self.epoch > 0

  def next_row(self) -> dict:
    """The next row: one record's row, or (packing) the next pieces in order; a piece that does not fit the rest
    of the row is cut to fill it when `split` (pretraining text), else it opens the next row (next-fit). With
    `fits_fn` (comparisons) whole pieces are taken while fits_fn(taken + [piece]) holds."""
    if self.pack_fn is None:
      pieces = self._pieces()
      self._advance(len(pieces))
      return pieces[0]
    taken, used = [], 0
    while not self.done():
      pieces = self._pieces()
      if self.fits_fn is not None:
        if not self.fits_fn(taken + [pieces[self.chunk]]):
          break
        taken.append(pieces[self.chunk])
        self._advance(len(pieces))
        continue
      piece = tuple(x[self.offset:] for x in pieces[self.chunk])
      room = self.seq_len - used
      if len(piece[0]) > room:
        if self.split:  # fill the row; the rest of the piece opens the next row (as a new segment)
          taken.append(tuple(x[:room] for x in piece))
          self.offset += room
        break
      taken.append(piece)
      used += len(piece[0])
      self.offset = 0
      self._advance(len(pieces))
    return self.pack_fn(taken)


class Loader:
  """Infinite iterator of host-local training batches; `get_state`/`set_state` resume the exact stream.

  Every host builds the same global rows from the global record order and keeps its slice, so the global
  batch is the same whatever the number of hosts, and the (identical) state of any host resumes all of them.
  """

  def __init__(self, stream: _Stream, host_batch: int, process_index: int = 0, process_count: int = 1):
    self.stream, self.host_batch = stream, host_batch
    self.process_index, self.process_count = process_index, process_count
    self.num_records = len(stream.order_fn(0))

  def __iter__(self) -> "Loader":
    return self

  def __next__(self) -> dict:
    rows = [self.stream.next_row() for _ in range(self.host_batch * self.process_count)]
    lo = self.process_index * self.host_batch
    return _collate(rows[lo:lo + self.host_batch])

  def get_state(self) -> dict:
    s = self.stream
    return {"epoch": s.epoch, "position": s.position, "chunk": s.chunk, "offset": s.offset,
            "records": self.num_records}

  def set_state(self, state: dict) -> None:
    """Resumes at `state` from `get_state`; ValueError if it was saved for a different shard of data."""
    if int(state.get("records", -1)) != self.num_records or not 0 <= int(state["position"]) < self.num_records:
      raise ValueError(f"loader state {state} does not fit this data ({self.num_records} records on this host); "
                       f"did the data files or process_count change?")
    s = self.stream
    s.epoch, s.position, s.chunk = int(state["epoch"]), int(state["position"]), int(state["chunk"])
    s.offset = int(state.get("offset", 0))


class EvalLoader:
  """One unshuffled pass per `iter()`: global batches built identically on every host, this host's slice."""

  def __init__(self, make_stream: Callable[[], _Stream], host_batch: int, process_index: int, process_count: int):
    self.make_stream, self.host_batch = make_stream, host_batch
    self.process_index, self.process_count = process_index, process_count

  def __iter__(self) -> Iterator[dict]:
    stream, global_batch = self.make_stream(), self.host_batch * self.process_count
    lo = self.process_index * self.host_batch
    while not stream.done():
      rows = []
      while len(rows) < global_batch and not stream.done():
        rows.append(stream.next_row())
      rows += [_empty_like(rows[0])] * (global_batch - len(rows))
      yield _collate(rows[lo:lo + self.host_batch])


def host_batch_size(batch_size: int, process_count: int, local_device_count: int, field: str) -> int:
  """Rows per host; ValueError naming `field` unless they split evenly over hosts and local devices."""
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"{field}={batch_size} must be a positive multiple of process_count={process_count}")
  rows = batch_size // process_count
  if rows % local_device_count:
    raise ValueError(f"{field}={batch_size} gives {rows} rows per host, not divisible by the host's batch shards "
                     f"({local_device_count}: mesh.data × mesh.fsdp / process_count; by default its local devices)")
  return rows


LOADER_OPTIONS = {  # keyword options of every make_*_loader
    "train": True,  # False: one unshuffled pass, last batch padded with empty rows (EvalLoader)
    "split": "train",  # split of a "tfds:NAME" source (local files are one split)
    "text_key": "text",  # text field of JSONL / TFDS records for the LM loader
    "tfds_data_dir": None,  # where "tfds:NAME" datasets are prepared (None: TFDS's default)
    "local_device_count": None,  # batch shards per host the host batch must divide (None: its local devices)
    "batch_field": "data.batch_size",  # config name used in batch-size errors
}


def _loader(kind: str, source, workdir: str, pieces_fn: Callable, pack_fn: Callable | None, seq_len: int,
            batch_size: int, seed: int, process_index: int, process_count: int, options: dict,
            split: bool = False, fits_fn: Callable | None = None):
  """A training Loader (shuffled per epoch, host shard) or, with train=False, an EvalLoader."""
  unknown = sorted(set(options) - set(LOADER_OPTIONS))
  if unknown:
    raise TypeError(f"unknown loader option(s) {unknown}; expected some of {sorted(LOADER_OPTIONS)}")
  opts = {**LOADER_OPTIONS, **options}
  devices = opts["local_device_count"]
  if devices is None:
    from rlhf_jax import parallel  # the one device-aware module
    devices = parallel.device_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  rows = host_batch_size(batch_size, process_count, devices, opts["batch_field"])
  records = Records(source, kind, workdir, opts["split"], opts["text_key"], opts["tfds_data_dir"])
  n = len(records)
  if kind != "text":  # every record tokenized once now, so a bad one fails before any step is compiled
    for i in range(n):
      pieces_fn(records[i])
  if not opts["train"]:
    return EvalLoader(lambda: _Stream(records, lambda e: np.arange(n), pieces_fn, pack_fn, seq_len, True, split,
                                      fits_fn), rows, process_index, process_count)

  def order(epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)

  return Loader(_Stream(records, order, pieces_fn, pack_fn, seq_len, False, split, fits_fn), rows, process_index,
                process_count)


def make_lm_loader(source, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int, workdir: str,
                   process_index: int = 0, process_count: int = 1, **options):
  """Packed LM batches from text files (a document per line), JSONL {text_key}, or "tfds:NAME" + text_key.

  Rows are filled completely: a chunk that does not fit the rest of a row is cut, and its remainder opens
  the next row as a new segment (positions restart), so no slot is padding except at the end of an eval pass.
  """
  return _loader("text", source, workdir, lambda r: lm_pieces(r, tokenizer, seq_len),
                 lambda p: pack(p, seq_len, tokenizer.pad_id), seq_len, batch_size, seed, process_index,
                 process_count, options, split=True)


def make_sft_loader(source, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int, workdir: str,
                    process_index: int = 0, process_count: int = 1, truncate_prompt: bool = False, **options):
  """Packed SFT batches (loss on response tokens + eos) from JSONL {prompt, response}."""
  return _loader("sft", source, workdir, lambda r: sft_pieces(r, tokenizer, seq_len, truncate_prompt),
                 lambda p: pack(p, seq_len, tokenizer.pad_id), seq_len, batch_size, seed, process_index,
                 process_count, options)


def make_comparison_loader(source, tokenizer: Tokenizer, seq_len: int, batch_size: int, max_responses: int,
                           seed: int, workdir: str, process_index: int = 0, process_count: int = 1,
                           truncate_prompt: bool = False, pack: bool = True, max_records: int | None = None,
                           record_values: Callable[[dict], dict] | None = None, **options):
  """Reward-model batches from JSONL comparisons (ranking or chosen/rejected): batch_size elements of
  max_responses rows × seq_len, each holding whole records (every response of a record in the same element).

  pack=True: as many records as fit (next-fit, at most max_records per element, default max(1, seq_len // 16)),
  their sequences placed first-fit in the rows as segments; pack=False: one record per element, response k in
  row k (the padded layout). Fields: tokens, segment_ids, positions, best_mask, response_idx (B, Kmax, L);
  last_idx, rank, valid
  (B, R, Kmax) with R = max_records (1 unpacked) and last_idx a flat slot index into the element's Kmax·L slots.
  `record_values(record) -> {name: values_K}` adds per-response float fields (B, R, Kmax) (DPO's reference log-probs).
  """
  R = max(1, seq_len // 16) if max_records is None else int(max_records)
  if R < 1:
    raise ValueError(f"make_comparison_loader: max_records={max_records} must be >= 1")
  def pieces(record):
    out = comparison_pieces(record, tokenizer, seq_len, max_responses, truncate_prompt)
    return out if record_values is None else [dict(out[0], values=record_values(record))]

  return _loader("comparison", source, workdir, pieces,
                 lambda p: pack_comparisons(p, seq_len, max_responses, R, tokenizer.pad_id, pack),
                 seq_len, batch_size, seed, process_index, process_count, options,
                 fits_fn=lambda p: place_comparisons(p, seq_len, max_responses, R, pack) is not None)


def make_prompt_loader(source, tokenizer: Tokenizer, prompt_len: int, batch_size: int, seed: int, workdir: str,
                       process_index: int = 0, process_count: int = 1, truncate_prompt: bool = False, **options):
  """RL prompt batches: left-padded [bos] + prompt (B, P), its mask, and the prompt strings."""
  return _loader("prompt", source, workdir, lambda r: prompt_pieces(r, tokenizer, prompt_len, truncate_prompt),
                 None, prompt_len, batch_size, seed, process_index, process_count,
                 {"batch_field": "ppo.batch_size", **options})
