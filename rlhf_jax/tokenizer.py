"""sentencepiece tokenizers: train one on local text, load one (ours or a LLaMA-style `tokenizer.model`).

Models trained here use ids pad=0, unk=1, bos=2, eos=3, byte fallback (any text encodes, nothing maps to unk),
identity normalisation, no dummy prefix and no whitespace folding, with "\\n" as a piece of its own, so
`decode(encode(text)) == text` for every string and `encode(a) + encode(b)` decodes to `a + b` at piece
boundaries such as the "\\n" that ends every prompt. `encode` never adds bos/eos; the data pipeline does.

A loaded model with no pad piece (LLaMA's `tokenizer.model` has pad_id = -1) gets `pad_id = eos_id`
(or 0 when it has no eos either). Padding is always masked out downstream, so the choice never reaches a loss.
"""
from __future__ import annotations

import os
from typing import Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram", "char", "word")


class Tokenizer:
  """A sentencepiece model with the ids the data pipeline needs; `encode` adds no bos/eos."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer model {path!r} does not exist")
    self.path = os.path.abspath(path)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(self.path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"tokenizer model {path!r} is not a sentencepiece model: {e}") from e
    self.vocab_size = int(self._sp.GetPieceSize())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    self.unk_id = int(self._sp.unk_id())
    pad = int(self._sp.pad_id())
    self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id >= 0 else 0)
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f"tokenizer model {path!r} has no bos or eos piece (bos_id={self.bos_id}, "
                       f"eos_id={self.eos_id}); both are needed to frame documents")

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    if not isinstance(text, str):
      raise ValueError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
    return self._sp.EncodeAsIds(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; pad/bos/eos (control pieces) decode to nothing."""
    return self._sp.DecodeIds([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  def __repr__(self) -> str:
    return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, pad={self.pad_id}, bos={self.bos_id}, "
            f"eos={self.eos_id})")


def train_tokenizer(text_files: str | Sequence[str], model_prefix: str, vocab_size: int,
                    model_type: str = "bpe", character_coverage: float = 1.0,
                    max_sentence_length: int = 16384) -> Tokenizer:
  """Trains a sentencepiece model on local text (one sentence per line) -> `{model_prefix}.model`; deterministic.

  Training uses one thread and every input line (no sampling), so the same files give the same model.
  `vocab_size` must cover 4 specials + "\\n" + 256 byte pieces + the merges; a corpus too small to
  supply that many pieces is a ValueError naming both.
  """
  files = [text_files] if isinstance(text_files, str) else list(text_files)
  if not files:
    raise ValueError("train_tokenizer: no text files given")
  for f in files:
    if not os.path.isfile(f):
      raise ValueError(f"train_tokenizer: text file {f!r} does not exist")
    if os.path.getsize(f) == 0:
      raise ValueError(f"train_tokenizer: text file {f!r} is empty")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"train_tokenizer: model_type={model_type!r}; expected one of {MODEL_TYPES}")
  if vocab_size < 262:
    raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is below 262 (4 specials + '\\n' + 256 bytes "
                     f"+ 1); byte fallback needs them all")
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  try:
    spm.SentencePieceTrainer.Train(
        input=files, model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, byte_fallback=True,
        user_defined_symbols=["\n"], normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        character_coverage=character_coverage, max_sentence_length=max_sentence_length,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"train_tokenizer: sentencepiece failed for vocab_size={vocab_size} on {files}: {e}") from e
  return Tokenizer(model_prefix + ".model")


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a sentencepiece model file, or `tokenizer.model` inside a directory (e.g. an `hf:` checkpoint dir)."""
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.model")
  if not os.path.isfile(path):
    raise ValueError(f"tokenizer model {path!r} does not exist")
  return Tokenizer(path)


def check_vocab(tokenizer: Tokenizer, vocab_size: int, what: str = "model.vocab_size") -> None:
  """ValueError naming both sizes when the tokenizer's vocabulary differs from the model's."""
  if tokenizer.vocab_size != vocab_size:
    raise ValueError(f"{what}={vocab_size} but tokenizer {tokenizer.path!r} has vocab_size="
                     f"{tokenizer.vocab_size}; they must match")
