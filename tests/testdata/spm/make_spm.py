"""Rebuilds spm.model (the tiny committed test tokenizer) from corpus.txt: python tests/testdata/spm/make_spm.py."""
import os

from rlhf_jax import tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
  tok = tokenizer.train_tokenizer(os.path.join(HERE, "corpus.txt"), os.path.join(HERE, "spm"), vocab_size=512)
  print(tok)
