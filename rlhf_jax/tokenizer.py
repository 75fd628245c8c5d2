"""One tokenizer interface over sentencepiece models, HF tokenizers (tokenizer.json, vocab.json + merges.txt) and
the vocabularies embedded in GGUF files; train a sentencepiece model on local text; find a workdir's tokenizer.

Models trained here use ids pad=0, unk=1, bos=2, eos=3, byte fallback (any text encodes, nothing maps to unk),
identity normalisation, no dummy prefix and no whitespace folding, with "\\n" as a piece of its own, so
`decode(encode(text)) == text` for every string and `encode(a) + encode(b)` decodes to `a + b` at piece
boundaries such as the "\\n" that ends every prompt. `encode` never adds bos/eos; the data pipeline frames
documents as `bos_prefix + ids + [eos_id]`, where `bos_prefix` is `[bos_id]` only when the tokenizer says to
add one (`add_bos`: HF's `add_bos_token`; GPT-2, Qwen and SmolLM add none).

A tokenizer with no pad token (LLaMA's `tokenizer.model` has pad_id = -1, GPT-2 has none) gets `pad_id = eos_id`.
Padding is always masked out downstream, so the choice never reaches a loss. A stage's workdir holds the
tokenizer as `tokenizer.model` (a sentencepiece model with the defaults) or as a `tokenizer/` folder
(tokenizer.json or tokenizer.model + tokenizer_config.json); `load_tokenizer(workdir)` finds either.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram", "char", "word")
SPM_FILE, HF_DIR = "tokenizer.model", "tokenizer"  # a workdir's tokenizer: WORKDIR/tokenizer.model or WORKDIR/tokenizer/


class BaseTokenizer:
  """What every tokenizer gives the pipeline: ids, framing (bos_prefix, prompt_parts), decoding, saving."""
  kind = "base"
  path: str
  vocab_size: int  # ids are 0 .. vocab_size - 1 (the model may have more embedding rows, never fewer)
  pad_id: int
  bos_id: int  # -1 when the tokenizer has none (then add_bos is False)
  eos_id: int
  unk_id: int
  add_bos: bool = True  # frame documents and prompts with bos
  chat_template: str | None = None  # the checkpoint's jinja2 chat template
  apply_chat: bool = False  # prompts are rendered with chat_template (see prompt_parts)

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  @property
  def bos_prefix(self) -> list[int]:
    """[bos_id] when the tokenizer adds a bos, else []."""
    return [self.bos_id] if self.add_bos else []

  def prompt_parts(self, prompt: str) -> tuple[list[int], list[int]]:
    """(kept prefix, ids that may be cut from the left) of a prompt: (bos_prefix, encode(prompt)), or with
    apply_chat ([], encode(render_chat(prompt))) (the template writes any bos itself, as transformers does)."""
    if self.apply_chat:
      return [], self.encode(self.render_chat(prompt))
    return self.bos_prefix, self.encode(prompt)

  def render_chat(self, prompt: str) -> str:
    """The chat template applied to [{"role": "user", "content": prompt}] with add_generation_prompt=True."""
    from rlhf_jax.chat import render
    if not self.chat_template:
      raise ValueError(f"tokenizer {self.path!r} has no chat_template (config data.chat_template=True needs one)")
    return render(self.chat_template, [{"role": "user", "content": prompt}], bos_token=self._piece(self.bos_id),
                  eos_token=self._piece(self.eos_id), where=self.path)

  def with_chat_template(self) -> "BaseTokenizer":
    """A copy whose prompts are rendered with the chat template; ValueError if it has none."""
    if not self.chat_template:
      raise ValueError(f"config data.chat_template=True but tokenizer {self.path!r} has no chat_template")
    out = copy.copy(self)
    out.apply_chat = True
    return out

  def _piece(self, i: int) -> str:
    return self.id_to_piece(i) if 0 <= i < self.vocab_size else ""

  def id_to_piece(self, i: int) -> str:
    raise NotImplementedError

  def _config(self) -> dict:
    """tokenizer_config.json written beside the saved files."""
    names = {f"{s}_token": self._piece(getattr(self, f"{s}_id")) or None for s in ("bos", "eos", "pad", "unk")}
    return {**names, "add_bos_token": self.add_bos, "chat_template": self.chat_template,
            "rlhf_jax_apply_chat_template": self.apply_chat}

  def save(self, workdir: str) -> str:
    """Writes the tokenizer into `workdir` (HF_DIR/ or SPM_FILE, removing the other form); returns the path."""
    raise NotImplementedError

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, pad={self.pad_id}, "
            f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos}, apply_chat={self.apply_chat})")


def _clear(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def write_config(directory: str, config: dict) -> None:
  """tokenizer_config.json in `directory`."""
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=1, ensure_ascii=False)


class SentencePieceTokenizer(BaseTokenizer):
  """A sentencepiece model with the ids the data pipeline needs; `encode` adds no bos/eos.

  `configs` (from `hf_tokenizer.read_configs` of an HF checkpoint folder) may set add_bos, pad and the chat
  template; the model's own bos/eos/unk ids are kept.
  """
  kind = "sentencepiece"

  def __init__(self, path: str, configs: dict | None = None):
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer model {path!r} does not exist")
    self.path = os.path.abspath(path)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(self.path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"tokenizer model {path!r} is not a sentencepiece model: {e}") from e
    configs = configs or {}
    self.vocab_size = int(self._sp.GetPieceSize())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    self.unk_id = int(self._sp.unk_id())
    self.add_bos = bool(configs.get("add_bos", True))
    self.chat_template = configs.get("chat_template")
    self.apply_chat = bool(configs.get("apply_chat_template", False))
    pad = int(self._sp.pad_id())
    if isinstance(configs.get("pad"), str) and self._sp.PieceToId(configs["pad"]) != self.unk_id:
      pad = int(self._sp.PieceToId(configs["pad"]))
    self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id >= 0 else 0)
    if self.eos_id < 0 or (self.add_bos and self.bos_id < 0):
      raise ValueError(f"tokenizer model {path!r} has no bos or eos piece (bos_id={self.bos_id}, "
                       f"eos_id={self.eos_id}); both are needed to frame documents")

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    if not isinstance(text, str):
      raise ValueError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
    return self._sp.EncodeAsIds(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; pad/bos/eos (control pieces) and ids past the vocabulary decode to nothing."""
    return self._sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  def id_to_piece(self, i: int) -> str:
    """The piece of id `i`."""
    return self._sp.IdToPiece(int(i))

  def _defaults(self) -> bool:
    return self.add_bos and not self.chat_template and not self.apply_chat

  def save(self, workdir: str) -> str:
    """WORKDIR/tokenizer.model, or WORKDIR/tokenizer/{tokenizer.model, tokenizer_config.json} when the settings
    are not the defaults (no bos, a chat template)."""
    os.makedirs(workdir, exist_ok=True)
    folder = os.path.join(workdir, HF_DIR)
    dest = os.path.join(workdir, SPM_FILE) if self._defaults() else os.path.join(folder, SPM_FILE)
    if os.path.abspath(self.path) != os.path.abspath(dest):
      _clear(folder if self._defaults() else os.path.join(workdir, SPM_FILE))
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.copyfile(self.path, dest)
    if not self._defaults():
      write_config(folder, self._config())
    return dest


Tokenizer = SentencePieceTokenizer  # the name code outside the package imports


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


def load_tokenizer(path: str) -> BaseTokenizer:
  """A tokenizer from a sentencepiece `.model`, an HF `tokenizer.json`, a `.gguf` file, or a folder: a workdir
  (its `tokenizer/` folder or `tokenizer.model`) or an HF checkpoint (tokenizer.json > vocab.json + merges.txt >
  tokenizer.model, with tokenizer_config.json / special_tokens_map.json / generation_config.json)."""
  from rlhf_jax import hf_tokenizer as hft
  if not os.path.exists(path):
    raise ValueError(f"tokenizer {path!r} does not exist")
  if os.path.isdir(path):
    if os.path.isdir(os.path.join(path, HF_DIR)):
      return load_tokenizer(os.path.join(path, HF_DIR))
    files = {n: os.path.join(path, n) for n in ("tokenizer.json", "vocab.json", "merges.txt", SPM_FILE)}
    have = {n for n, f in files.items() if os.path.isfile(f)}
    if "tokenizer.json" in have or {"vocab.json", "merges.txt"} <= have:
      return hft.HFTokenizer.from_folder(path)
    if SPM_FILE in have:
      return SentencePieceTokenizer(files[SPM_FILE], hft.read_configs(path))
    raise ValueError(f"tokenizer folder {path!r} has none of tokenizer.json, vocab.json + merges.txt, "
                     f"{SPM_FILE} or {HF_DIR}/")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"GGUF":
    return hft.HFTokenizer.from_gguf(path)
  if path.endswith(".json"):
    return hft.HFTokenizer.from_folder(os.path.dirname(os.path.abspath(path)), tokenizer_json=path)
  configs = hft.read_configs(os.path.dirname(os.path.abspath(path))) if os.path.basename(path) == SPM_FILE else None
  return SentencePieceTokenizer(path, configs)


def check_vocab(tokenizer: BaseTokenizer, vocab_size: int, what: str = "model.vocab_size",
                exact: bool = True) -> None:
  """ValueError naming both sizes when the tokenizer has ids the model's embedding lacks, or (exact) when the
  sizes differ; HF checkpoints pad their embeddings to a multiple of 64/128, so their sources pass exact=False."""
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"{what}={vocab_size} but tokenizer {tokenizer.path!r} has vocab_size="
                     f"{tokenizer.vocab_size}: the model has fewer embedding rows than the tokenizer has ids")
  if exact and tokenizer.vocab_size != vocab_size:
    raise ValueError(f"{what}={vocab_size} but tokenizer {tokenizer.path!r} has vocab_size="
                     f"{tokenizer.vocab_size}; they must match")
