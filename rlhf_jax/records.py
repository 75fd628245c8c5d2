"""Data sources -> validated records: local text/JSONL files (cached as an array_record TFDS dataset in the
workdir, keyed by content) or a registered TFDS dataset read by name, with random access.

A malformed record is a ValueError "path:line: message"; a missing or empty file fails before anything is built.
Record kinds: "text" {"text"}, "sft" {"prompt", "response"}, "comparison" {"prompt", "responses", "ranking"}
(or {"prompt", "chosen", "rejected"}), "prompt" {"prompt"}.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

KINDS = ("text", "sft", "comparison", "prompt")
_FORMAT_VERSION = "1.0.0"  # bump when the stored record layout changes (invalidates workdir/tfds caches)


# ------------------------------------------------------------------------------------------- records


def _need_str(obj: dict, key: str, where: str) -> str:
  if key not in obj:
    raise ValueError(f"{where}: missing field {key!r} (has {sorted(obj)})")
  if not isinstance(obj[key], str):
    raise ValueError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
  if not obj[key].strip():
    raise ValueError(f"{where}: field {key!r} is empty")
  return obj[key]


def _comparison(obj: dict, where: str) -> dict:
  prompt = _need_str(obj, "prompt", where)
  if "responses" in obj and ("chosen" in obj or "rejected" in obj):
    raise ValueError(f"{where}: give either 'responses'+'ranking' or 'chosen'+'rejected', not both")
  if "responses" not in obj and "chosen" in obj:
    return {"prompt": prompt, "responses": [_need_str(obj, "chosen", where), _need_str(obj, "rejected", where)],
            "ranking": [0, 1]}
  responses, ranking = obj.get("responses"), obj.get("ranking")
  if not isinstance(responses, list):
    raise ValueError(f"{where}: field 'responses' must be a list of strings (or give 'chosen'+'rejected')")
  if len(responses) < 2:
    raise ValueError(f"{where}: a comparison needs K >= 2 responses, got {len(responses)}")
  responses = [_need_str({f"responses[{i}]": r}, f"responses[{i}]", where) for i, r in enumerate(responses)]
  if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
    raise ValueError(f"{where}: field 'ranking' must be a list of integers, got {ranking!r}")
  if sorted(ranking) != list(range(len(responses))):
    raise ValueError(f"{where}: ranking {ranking} is not a permutation of 0..{len(responses) - 1}")
  return {"prompt": prompt, "responses": responses, "ranking": ranking}


def validate_record(obj: Any, kind: str, where: str, text_key: str = "text") -> dict:
  """The normalised record of `kind` from a parsed JSON object; ValueError "where: message" if invalid."""
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  if kind == "text":
    return {"text": _need_str(obj, text_key, where)}
  if kind == "sft":
    return {"prompt": _need_str(obj, "prompt", where), "response": _need_str(obj, "response", where)}
  if kind == "comparison":
    return _comparison(obj, where)
  if kind == "prompt":
    return {"prompt": _need_str(obj, "prompt", where)}
  raise ValueError(f"record kind {kind!r}; expected one of {KINDS}")


def _lines(path: str) -> Iterator[tuple[int, str]]:
  """(1-based line number, text without the newline) of every non-blank line; ValueError on bad UTF-8."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid UTF-8 ({e})") from e
      if line.strip():
        yield n, line


def read_jsonl(path: str, kind: str, text_key: str = "text") -> Iterator[dict]:
  """Validated records of a JSONL file, each with `origin` = "path:line"; blank lines are skipped."""
  for n, line in _lines(path):
    where = f"{path}:{n}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from e
    yield {**validate_record(obj, kind, where, text_key), "origin": where}


def read_records(path: str, kind: str, text_key: str = "text") -> Iterator[dict]:
  """Records of one local file: `.jsonl` is JSON per line; any other file is text, one document per line."""
  if path.endswith(".jsonl"):
    yield from read_jsonl(path, kind, text_key)
  elif kind != "text":
    raise ValueError(f"{path}: {kind} data must be a .jsonl file")
  else:
    for n, line in _lines(path):
      yield {"text": line, "origin": f"{path}:{n}"}


# ------------------------------------------------------------------------------------------- sources


def _features(kind: str):
  text = tfds.features.Text()
  fields = {"text": ["text"], "sft": ["prompt", "response"], "comparison": ["prompt"], "prompt": ["prompt"]}[kind]
  features = {"origin": text, **{f: text for f in fields}}
  if kind == "comparison":
    features.update(responses=tfds.features.Sequence(text), ranking=tfds.features.Sequence(np.int32))
  return tfds.features.FeaturesDict(features)


class _LocalInfo(tfds.core.DatasetInfo):
  """DatasetInfo of local files: there is no pre-computed metadata to fetch from a bucket (TFDS 4.9's
  `initialize_from_bucket` leaves an empty `tmp*tfds` folder in the system temp dir on every builder it constructs)."""

  def initialize_from_bucket(self) -> None:
    pass


class LocalRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder over validated local files: one `train` split in file order."""
  VERSION = tfds.core.Version(_FORMAT_VERSION)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # no checksums file; TFDS's lookup for a package module needs importlib_resources
    return None

  def __init__(self, kind: str, files: Sequence[str], text_key: str = "text", **kwargs):
    self._kind, self._files, self._text_key = kind, list(files), text_key
    super().__init__(**kwargs)

  def _info(self):
    return _LocalInfo(builder=self, features=_features(self._kind), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    i = 0
    for path in self._files:
      start = i
      for record in read_records(path, self._kind, self._text_key):
        yield i, record
        i += 1
      if i == start:
        raise ValueError(f"{path}: no records (empty file)")


def _content_key(files: Sequence[str], kind: str, text_key: str) -> str:
  h = hashlib.sha256(f"{_FORMAT_VERSION}|{kind}|{text_key}".encode())
  for path in files:
    h.update(f"|{os.path.abspath(path)}|".encode())
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()[:16]


def _decode(x: Any) -> Any:
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, (list, tuple, np.ndarray)):
    return [_decode(v) for v in x]
  return x.item() if isinstance(x, np.generic) else x


class Records:
  """Random access to validated records (dicts with `origin`) of local files or a registered TFDS split."""

  def __init__(self, source: str | Sequence[str], kind: str, workdir: str, split: str = "train",
               text_key: str = "text", tfds_data_dir: str | None = None):
    self.kind, self.text_key = kind, text_key
    self._local = not (isinstance(source, str) and source.startswith("tfds:"))
    if self._local:
      files = [f.strip() for f in source.split(",") if f.strip()] if isinstance(source, str) else list(source)
      self.name, self._ds = ",".join(files), _local_split(files, kind, text_key, workdir)
    else:
      self.name, self._ds = source, _tfds_split(source[5:], split, tfds_data_dir)
    if len(self._ds) == 0:
      raise ValueError(f"{self.name}: no records")
    self[0]  # a registered dataset without the expected fields fails here, not mid-training

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i: int) -> dict:
    record = {k: _decode(v) for k, v in self._ds[int(i)].items()}
    if self._local:
      return record
    where = f"{self.name}[{i}]"
    return {**validate_record(record, self.kind, where, self.text_key), "origin": where}


def _local_split(files: Sequence[str], kind: str, text_key: str, workdir: str):
  """Validated local files as an array_record data source, built once under workdir/tfds/<kind>-<hash>."""
  if not files:
    raise ValueError("no data files given")
  for f in files:
    if not os.path.isfile(f):
      raise ValueError(f"data file {f!r} does not exist")
  data_dir = os.path.join(workdir, "tfds", f"{kind}-{_content_key(files, kind, text_key)}")
  make = lambda: LocalRecords(kind, files, text_key, data_dir=data_dir, file_format="array_record")
  builder = make()
  if not builder.is_prepared():
    tfds.disable_progress_bar()
    try:
      builder.download_and_prepare()
    except ValueError:
      raise
    except Exception:  # another process sharing the workdir may have finished the same build first
      builder = make()
      if not builder.is_prepared():
        raise
  return builder.as_data_source("train")


def _tfds_split(name: str, split: str, data_dir: str | None):
  """A registered TFDS split as an array_record data source (prepared first if absent: may download)."""
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"tfds:{name}: no registered TFDS dataset of that name") from e
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  return builder.as_data_source(split)
