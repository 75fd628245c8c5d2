"""Tokenizer tests on real sentencepiece models trained on the small committed corpus."""
import os

import pytest
import sentencepiece as spm

from rlhf_jax import tokenizer

SPM_DIR = os.path.join(os.path.dirname(__file__), "testdata", "spm")
CORPUS = os.path.join(SPM_DIR, "corpus.txt")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer.train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("spm") / "tok"), vocab_size=400)


def test_special_ids_and_no_bos_eos_added(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 400
  ids = tok.encode("The quick brown fox.")
  assert ids and tok.bos_id not in ids and tok.eos_id not in ids and tok.pad_id not in ids
  assert os.path.isfile(tok.path) and tok.path.endswith("tok.model")


def test_round_trip_on_real_text(tok):
  with open(CORPUS, encoding="utf-8") as f:
    text = f.read()
  for line in text.splitlines():
    assert tok.decode(tok.encode(line)) == line
  whole = tok.encode(text)
  assert tok.decode(whole) == text
  assert len(whole) < len(text.encode("utf-8"))  # merges learned: fewer tokens than bytes
  unseen = "Zebra 漢字 ☃ €12\tx  y"  # characters absent from the corpus go through byte pieces
  ids = tok.encode(unseen)
  assert tok.unk_id not in ids and tok.decode(ids) == unseen


def test_newline_survives_and_prompts_concatenate(tok):
  newline = tok.encode("\n")
  assert len(newline) == 1 and tok.id_to_piece(newline[0]) == "\n"
  for text in ["Question: what is 2 plus 2?\n", "a\n\nb\n", "\n", "  indented\n  twice\n"]:
    assert tok.decode(tok.encode(text)) == text
  prompt, response = "Question: what is 7 times 8?\n", "Answer: 56."
  ids = tok.encode(prompt) + tok.encode(response)
  assert tok.decode(ids) == prompt + response
  assert tok.encode(prompt)[-1] == newline[0]


def test_training_is_deterministic(tmp_path, tok):
  again = tokenizer.train_tokenizer(CORPUS, str(tmp_path / "again"), vocab_size=400)
  pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]  # the proto also records the output path
  assert pieces == [again.id_to_piece(i) for i in range(again.vocab_size)]
  assert len(set(pieces)) == tok.vocab_size


def test_committed_model_loads_and_round_trips():
  tok = tokenizer.load_tokenizer(os.path.join(SPM_DIR, "spm.model"))
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (512, 0, 2, 3)
  text = "Reward models compare two answers.\nThe policy writes a response.\n"
  assert tok.decode(tok.encode(text)) == text
  assert tokenizer.load_tokenizer(SPM_DIR + "/spm.model").path == tok.path


def test_llama_style_model_without_pad_falls_back_to_eos(tmp_path):
  prefix = str(tmp_path / "llama_like")
  spm.SentencePieceTrainer.Train(input=CORPUS, model_prefix=prefix, vocab_size=400, model_type="bpe",
                                 pad_id=-1, unk_id=0, bos_id=1, eos_id=2, byte_fallback=True, minloglevel=2)
  os.rename(prefix + ".model", str(tmp_path / "tokenizer.model"))
  tok = tokenizer.load_tokenizer(str(tmp_path))  # a directory holding tokenizer.model
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)


def test_check_vocab(tok):
  tokenizer.check_vocab(tok, 400)
  with pytest.raises(ValueError, match=r"model\.vocab_size=512.*vocab_size=400"):
    tokenizer.check_vocab(tok, 512)
  with pytest.raises(ValueError, match=r"cfg\.v=7"):
    tokenizer.check_vocab(tok, 7, what="cfg.v")


def test_missing_and_bad_files(tmp_path):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(ValueError, match="nope.model"):
    tokenizer.load_tokenizer(missing)
  with pytest.raises(ValueError, match="nope.txt"):
    tokenizer.train_tokenizer(str(tmp_path / "nope.txt"), str(tmp_path / "t"), vocab_size=400)
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="junk.model"):
    tokenizer.load_tokenizer(str(junk))
  with pytest.raises(ValueError, match="vocab_size=100"):
    tokenizer.train_tokenizer(CORPUS, str(tmp_path / "t"), vocab_size=100)
  with pytest.raises(ValueError, match="vocab_size=270"):  # fewer than the bytes + characters required
    tokenizer.train_tokenizer(CORPUS, str(tmp_path / "t"), vocab_size=270)
