"""BPE tokenizers through HF's `tokenizers` library (Rust, no torch): `tokenizer.json`, GPT-2 style `vocab.json` +
`merges.txt`, and the vocabulary embedded in a llama.cpp GGUF file (`tokenizer.ggml.model` "gpt2": byte-level
BPE + merges; "llama": sentencepiece pieces + scores, as a byte-fallback BPE whose merges the scores rank).

Special tokens come from the checkpoint's config files (tokenizer_config.json > special_tokens_map.json >
generation_config.json ids), or for a GGUF file from its `tokenizer.ggml.*_token_id` keys. Whether a bos is
prepended follows `add_bos_token` (GGUF: `tokenizer.ggml.add_bos_token`), else what tokenizer.json's
post-processor adds, as transformers does. A model without a pad token gets pad = eos (padding is masked out
downstream). Special and added tokens written in the text (`<|im_start|>`) encode to their ids.

GGUF pre-tokenization follows llama.cpp's table for `tokenizer.ggml.pre` (`GGUF_PRE`); e.g. "smollm" splits
every digit on its own like the original SmolLM2 tokenizer.json (transformers' GGUF loader does not: it groups
digits). No normaliser is applied to GGUF text, as in llama.cpp.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from rlhf_jax.tokenizer import HF_DIR, SPM_FILE, BaseTokenizer, write_config  # tokenizer imports us lazily

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
SPECIALS = ("bos", "eos", "pad", "unk")
EOS_GUESSES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>")  # a bare tokenizer.json's eos

_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_KINDS = {  # llama.cpp's llm_tokenizer_bpe regexes, per `tokenizer.ggml.pre`
    "gpt2": ("gpt-2", "gpt2", "mpt", "olmo", "jais"),
    "digits+gpt2": ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
    "llama3": ("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"),
    "qwen2": ("qwen2", "qwen2.5", "qwen-2.5", "deepseek-r1-qwen"),
}
GGUF_PRE = {name: kind for kind, names in _PRE_KINDS.items() for name in names}
GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_BYTE = 3, 4, 6  # tokenizer.ggml.token_type values matched whole in text (3: special)


def byte_level_pre_tokenizer(kind: str):
  """The pre-tokenizer of one of `_PRE_KINDS`: a regex split (GPT-2's inside ByteLevel, or another) + bytes."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt2", "digits+gpt2"))
  if kind == "gpt2":
    return byte_level
  if kind == "digits+gpt2":
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  regex = {"llama3": _LLAMA3, "qwen2": _QWEN2}[kind]
  return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level])


def _content(v):
  """A config's special-token entry: a string, an AddedToken dict {"content": ...}, or None."""
  return v.get("content") if isinstance(v, dict) else v


def read_configs(directory: str) -> dict:
  """{"bos"/"eos"/"pad"/"unk": token string or id, "add_bos", "chat_template", "specials", "files"} from the HF
  config files in `directory` (missing files are skipped; a file that is not JSON is a ValueError naming it)."""
  out: dict = {"specials": [], "files": []}
  loaded = {}
  for name in CONFIG_FILES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      try:
        with open(path, encoding="utf-8") as f:
          loaded[name] = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"tokenizer config {path!r} is not valid JSON: {e}") from e
      out["files"].append(path)
  gen, smap, tcfg = (loaded.get(n, {}) for n in ("generation_config.json", "special_tokens_map.json",
                                                 "tokenizer_config.json"))
  for s in SPECIALS:
    ids = gen.get(f"{s}_token_id")
    out[s] = _content(tcfg.get(f"{s}_token", smap.get(f"{s}_token", ids[0] if isinstance(ids, list) else ids)))
  for cfg in (smap, tcfg):
    out["specials"] += [_content(t) for t in cfg.get("additional_special_tokens") or []]
  out["specials"] += [_content(t) for t in (tcfg.get("added_tokens_decoder") or {}).values()
                      if isinstance(t, dict) and t.get("special")]
  if "add_bos_token" in tcfg:
    out["add_bos"] = bool(tcfg["add_bos_token"])
  template = tcfg.get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
    template = next((t["template"] for t in template if t.get("name") == "default"), None)
  jinja = os.path.join(directory, "chat_template.jinja")
  if template is None and os.path.isfile(jinja):
    with open(jinja, encoding="utf-8") as f:
      template = f.read()
  out["chat_template"] = template
  out["apply_chat_template"] = bool(tcfg.get("rlhf_jax_apply_chat_template", False))
  return out


def _token_id(rust: RustTokenizer, value, where: str, field: str) -> int | None:
  """The id of a config's special token (a string, or already an id); ValueError if not in the vocabulary."""
  if value is None:
    return None
  if isinstance(value, int) and not isinstance(value, bool):
    if not 0 <= value < rust.get_vocab_size(with_added_tokens=True):
      raise ValueError(f"{where}: {field}={value} is outside the vocabulary "
                       f"({rust.get_vocab_size(with_added_tokens=True)} tokens)")
    return value
  i = rust.token_to_id(str(value))
  if i is None:
    raise ValueError(f"{where}: {field}={value!r} is not a token of the vocabulary")
  return i


def post_processor_prefix(rust: RustTokenizer) -> list[int]:
  """The ids the tokenizer's post-processor puts before the text (e.g. LLaMA-3's <|begin_of_text|>)."""
  bare = rust.encode("a", add_special_tokens=False).ids
  full = rust.encode("a", add_special_tokens=True).ids
  at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
  return full[:at]


def from_tokenizer_json(path: str) -> RustTokenizer:
  """A tokenizer.json file; ValueError naming it when it does not parse."""
  try:
    return RustTokenizer.from_file(path)
  except Exception as e:  # the Rust side raises a bare Exception
    raise ValueError(f"tokenizer file {path!r} is not a tokenizers tokenizer.json: {e}") from e


def from_vocab_merges(vocab: str, merges: str, add_prefix_space: bool = False) -> RustTokenizer:
  """GPT-2 style vocab.json + merges.txt: byte-level BPE with GPT-2's pre-tokenizer and decoder."""
  try:
    bpe = models.BPE.from_file(vocab, merges)
  except Exception as e:
    raise ValueError(f"tokenizer files {vocab!r} + {merges!r} are not a BPE vocab.json + merges.txt: {e}") from e
  rust = RustTokenizer(bpe)
  rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
  rust.decoder = decoders.ByteLevel()
  return rust


def add_specials(rust: RustTokenizer, tokens) -> None:
  """Registers `tokens` (strings) as special tokens matched whole in the text (ids from the vocab if present)."""
  tokens = [t for t in dict.fromkeys(tokens) if isinstance(t, str) and t]
  if tokens:
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])


def _gguf_value(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _gguf_merges(path: str, merges: list[str]) -> list[tuple[str, str]]:
  """(left, right) pairs; llama.cpp splits each entry at the first space after its first character."""
  pairs = []
  for m in merges:
    cut = m.find(" ", 1)
    if cut < 0:
      raise ValueError(f"GGUF {path!r}: tokenizer.ggml.merges entry {m!r} has no space")
    pairs.append((m[:cut], m[cut + 1:]))
  return pairs


def gguf_bpe(tokens: list[str], types: list[int], pairs: list[tuple[str, str]], pre_kind: str) -> RustTokenizer:
  """Byte-level BPE over a GGUF vocabulary: control tokens special, user-defined ones added (both matched whole)."""
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, ignore_merges=pre_kind == "llama3")
  rust = RustTokenizer(bpe)
  rust.pre_tokenizer = byte_level_pre_tokenizer(pre_kind)
  rust.decoder = decoders.ByteLevel()
  add_specials(rust, [t for t, ty in zip(tokens, types) if ty == GGUF_CONTROL])
  user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == GGUF_USER_DEFINED]
  if user:  # matched whole in the text, but decoded like text (llama.cpp, transformers)
    rust.add_tokens(user)
  return rust


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
  """BPE merges implied by a sentencepiece vocabulary: every split of a piece into two pieces, ranked by the
  merged piece's score (best first), as transformers' SentencePieceExtractor derives them."""
  vocab = {t: i for i, t in enumerate(tokens)}
  ranked = []
  for piece, score in zip(tokens, scores):
    local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    ranked += [(score, vocab[a], vocab[b], a, b) for a, b in local]
  ranked.sort(key=lambda r: (-r[0], r[1], r[2]))
  return [(a, b) for _, _, _, a, b in ranked]


def gguf_spm(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool) -> RustTokenizer:
  """A GGUF "llama" (sentencepiece BPE) vocabulary as a byte-fallback BPE: spaces become "▁", a "▁" is
  prepended when add_space_prefix (llama.cpp's default), <0xNN> pieces cover any byte."""
  unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=spm_merges(tokens, scores), unk_token=unk,
                   fuse_unk=True, byte_fallback=True)
  rust = RustTokenizer(bpe)
  steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
  rust.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
  tail = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
  rust.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()] + tail)
  add_specials(rust, [t for t, ty in zip(tokens, types) if ty == GGUF_CONTROL])
  return rust


def read_gguf(path: str) -> tuple[RustTokenizer, dict]:
  """(tokenizer, {"bos", "eos", "pad", "unk" ids, "add_bos", "chat_template"}) from a GGUF file's vocabulary."""
  try:
    from gguf import GGUFReader
  except ImportError as e:
    raise ValueError(f"tokenizer {path!r} is a GGUF file: reading it needs the optional `gguf` package "
                     f"(pip install -e .[gguf])") from e
  try:
    reader = GGUFReader(path)
  except Exception as e:
    raise ValueError(f"tokenizer {path!r} is not a readable GGUF file: {e}") from e
  kind = _gguf_value(reader, "tokenizer.ggml.model")
  if kind not in ("gpt2", "llama"):
    raise ValueError(f"GGUF {path!r}: tokenizer.ggml.model={kind!r} is not supported; 'gpt2' (byte-level BPE) "
                     f"and 'llama' (sentencepiece BPE) vocabularies load (convert the checkpoint's tokenizer.json)")
  tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
  if not tokens:
    raise ValueError(f"GGUF {path!r}: tokenizer.ggml.tokens missing")
  types = _gguf_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  pre = _gguf_value(reader, "tokenizer.ggml.pre")
  if kind == "llama":  # llama.cpp's spm defaults: bos 1, eos 2, unk 0, add bos, a space prefix
    scores = _gguf_value(reader, "tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
      raise ValueError(f"GGUF {path!r}: tokenizer.ggml.scores missing or not one per token")
    rust = gguf_spm(tokens, scores, types, bool(_gguf_value(reader, "tokenizer.ggml.add_space_prefix", True)))
    defaults = {"bos": 1, "eos": 2, "unk": 0, "add_bos": True}
  else:
    if pre not in GGUF_PRE:
      raise ValueError(f"GGUF {path!r}: tokenizer.ggml.pre={pre!r} is not a known pre-tokenizer; supported: "
                       f"{sorted(GGUF_PRE)}")
    merges = _gguf_value(reader, "tokenizer.ggml.merges")
    if merges is None:
      raise ValueError(f"GGUF {path!r}: tokenizer.ggml.merges missing")
    rust = gguf_bpe(tokens, types, _gguf_merges(path, merges), GGUF_PRE[pre])
    defaults = {"add_bos": False}
  info = {s: _gguf_value(reader, f"tokenizer.ggml.{key}_token_id", defaults.get(s))
          for s, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}
  info["add_bos"] = bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", defaults["add_bos"]))
  info["chat_template"] = _gguf_value(reader, "tokenizer.chat_template")
  info["pre"] = pre
  return rust, info


class HFTokenizer(BaseTokenizer):
  """A `tokenizers` tokenizer with the ids the data pipeline needs; `encode` adds no bos/eos (= transformers'
  `tokenizer(text)["input_ids"]` without the bos/eos it adds) and matches special tokens written in the text."""
  kind = "hf"

  def __init__(self, rust: RustTokenizer, path: str, info: dict):
    self._rust, self.path = rust, os.path.abspath(path)
    self.vocab_size = max(rust.get_vocab(with_added_tokens=True).values()) + 1
    where = self.path
    bos = _token_id(rust, info.get("bos"), where, "bos_token")
    eos = _token_id(rust, info.get("eos"), where, "eos_token")
    prefix = post_processor_prefix(rust)
    if bos is None and prefix:
      bos = prefix[0]
    if eos is None:
      eos = next((rust.token_to_id(t) for t in EOS_GUESSES if rust.token_to_id(t) is not None), None)
    if eos is None:
      raise ValueError(f"tokenizer {where!r} has no eos token (no eos_token in tokenizer_config.json / "
                       f"special_tokens_map.json / generation_config.json, none of {EOS_GUESSES}): one is needed "
                       f"to end documents")
    self.add_bos = bool(info["add_bos"]) if info.get("add_bos") is not None else bool(prefix)
    if self.add_bos and bos is None:
      raise ValueError(f"tokenizer {where!r}: add_bos_token is true but there is no bos_token")
    pad = _token_id(rust, info.get("pad"), where, "pad_token")
    unk = _token_id(rust, info.get("unk"), where, "unk_token")
    self.bos_id = -1 if bos is None else bos
    self.eos_id = eos
    self.pad_id = eos if pad is None else pad  # no pad token: eos (always masked out)
    self.unk_id = -1 if unk is None else unk
    self.chat_template = info.get("chat_template")
    self.apply_chat = bool(info.get("apply_chat_template", False))

  @classmethod
  def from_folder(cls, directory: str, tokenizer_json: str | None = None) -> "HFTokenizer":
    """An HF checkpoint folder: tokenizer.json (or the given file) or vocab.json + merges.txt, plus its configs."""
    info = read_configs(directory)
    path = tokenizer_json or os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
      rust = from_tokenizer_json(path)
    else:
      path = os.path.join(directory, "vocab.json")
      rust = from_vocab_merges(path, os.path.join(directory, "merges.txt"))
      if info.get("eos") is None and info.get("bos") is None and rust.token_to_id("<|endoftext|>") is not None:
        info.update(bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>")  # GPT2Tokenizer's defaults
    names = [info[s] for s in SPECIALS if isinstance(info[s], str)] + info["specials"]
    if path.endswith(".json") and not path.endswith("vocab.json"):  # tokenizer.json lists its added tokens
      names = [t for t in names if rust.token_to_id(t) is not None]
    add_specials(rust, names)
    return cls(rust, path, info)

  @classmethod
  def from_gguf(cls, path: str) -> "HFTokenizer":
    """The vocabulary, merges and special tokens embedded in a llama.cpp GGUF file."""
    rust, info = read_gguf(path)
    return cls(rust, path, info)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos; special tokens in the text map to their ids."""
    if not isinstance(text, str):
      raise ValueError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
    return self._rust.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special tokens and ids past the vocabulary (padded embedding rows) decode to nothing."""
    return self._rust.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    """The vocabulary entry of id `i` (byte-level spelling, e.g. "Ġthe")."""
    return self._rust.id_to_token(int(i)) or ""

  def save(self, workdir: str) -> str:
    """WORKDIR/tokenizer/{tokenizer.json, tokenizer_config.json} (a GGUF vocabulary becomes a tokenizer.json)."""
    folder, spm_file = os.path.join(workdir, HF_DIR), os.path.join(workdir, SPM_FILE)
    if os.path.exists(spm_file):
      os.remove(spm_file)
    if os.path.isdir(folder) and os.path.abspath(os.path.dirname(self.path)) != os.path.abspath(folder):
      shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, "tokenizer.json")
    self._rust.save(dest)
    write_config(folder, self._config())
    return dest
