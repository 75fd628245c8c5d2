"""The embedded task: short instructions scored by a programmatic oracle, in the InstructGPT data regime.

Prompt format: `"<instruction> ="`; the response follows after one space (`format_example`):
  prompt "sort: 7 2 9 4 ="   response "2 4 7 9"   text "sort: 7 2 9 4 = 2 4 7 9"
The separator is the trailing " =" (SEP), not a newline: sentencepiece's default normalization turns "\\n"
into a space, which would erase the boundary. Every character of a prompt or response also occurs in the corpus.

Families (the registry FAMILIES; add one with `register_family(Family(...))`):
  reverse: k3x9a          -> a9x3k    partial: positional character matches / longer length
  sort: 7 2 9 4           -> 2 4 7 9  partial: positional element matches / longer length
  add: 48+17              -> 65       partial: right-aligned digit matches / longer length
  count a: abacab         -> 3        partial: 0.5 when off by one
  ask: capital of zorbat? -> vexmo    knowledge (rlhf_jax/knowledge.py), only with TaskConfig.knowledge
A score is 1.0 exactly when the response, stripped of outer whitespace, is the answer; garbage scores 0.

A family may have an abstention answer (Family.abstain; knowledge: "unknown" for an entity absent from the corpus),
which TaskConfig.fabrication_penalty uses in the comparisons (rlhf_jax/rankings.py: how labelers rank K responses).

Data (deterministic in TaskConfig.seed; each product draws from its own rng stream): a pretraining corpus of
informal, noisy statements among filler sentences; labeler demonstrations, a fraction plausibly wrong; RL and
held-out prompts; comparisons ranking K sampled responses with label noise (rankings.make_comparisons; the writer,
write_comparisons, is here with the others). A prompt's split key (the instruction, or the entity for knowledge) is
hashed with the seed into train / rl / heldout, so the prompt sets are disjoint by construction; corpus statements
and demonstrations use train keys (knowledge facts: every known entity, since appearing in the corpus is what
"known" means). Prompts repeat within a split when its space is small (knowledge, add).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Callable, Optional

import numpy as np

SEP = " ="  # ends every prompt; the response follows after one space
DEMO_POLICIES = ("full_knowledge", "abstain_unknown")
KNOWLEDGE = "ask"  # name of the family TaskConfig.knowledge adds (rlhf_jax/knowledge.py registers it)
_MAX_RESPONSE_CHARS = 256  # longer (stripped) responses score 0 unparsed; every answer is far shorter
_SALTS = {"corpus": 1, "demonstrations": 2, "train": 3, "rl": 4, "heldout": 5, "comparisons": 6, "entities": 7,
          "comparison_prompts": 8}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Everything that determines the generated data; equal configs give byte-identical files."""
  seed: int = 0
  operations: tuple[str, ...] = ("reverse", "sort", "add", "count")  # families mixed uniformly
  num_corpus_docs: int = 4000  # pretraining documents, one per line
  num_demonstrations: int = 2000  # labeler (prompt, response) pairs
  num_rl_prompts: int = 1000
  num_heldout_prompts: int = 200
  num_comparison_prompts: int = 0  # distinct train-split prompts for the RM's comparisons beyond the demonstrations'
  heldout_fraction: float = 0.1  # share of split keys reserved for held-out prompts
  rl_fraction: float = 0.3  # share of split keys reserved for RL prompts
  demo_error_rate: float = 0.25  # demonstrations whose response is plausibly wrong
  corpus_noise_rate: float = 0.05  # corpus statements that state a wrong result
  comparison_noise_rate: float = 0.1  # chance a ranking has one random adjacent pair swapped
  num_candidates: int = 4  # K responses per comparison
  min_items: int = 3  # operand size: characters to reverse, numbers to sort
  max_items: int = 5
  min_sentences: int = 3  # sentences per corpus document
  max_sentences: int = 8
  filler_fraction: float = 0.5  # corpus sentences that are filler rather than statements
  knowledge: bool = False  # add the knowledge family
  demo_policy: str = "full_knowledge"  # labelers answer unknown entities: "full_knowledge" | "abstain_unknown"
  num_entities: int = 60  # knowledge entity pool, half known
  fabrication_penalty: bool = False  # comparisons rank assertions about unknown entities at rankings.FABRICATION_SCORE

  def __post_init__(self):
    object.__setattr__(self, "operations", tuple(self.operations))  # a ConfigDict may hand over a list
    _check(self.seed >= 0, "seed", self.seed, ">= 0")
    for f in ("num_corpus_docs", "num_demonstrations", "num_rl_prompts", "num_heldout_prompts", "min_sentences"):
      _check(getattr(self, f) > 0, f, getattr(self, f), "> 0")
    for f in ("heldout_fraction", "rl_fraction"):
      _check(0 < getattr(self, f) < 1, f, getattr(self, f), "in (0, 1)")
    _check(self.heldout_fraction + self.rl_fraction < 1, "heldout_fraction + rl_fraction",
           self.heldout_fraction + self.rl_fraction, "< 1")
    _check(self.num_comparison_prompts >= 0, "num_comparison_prompts", self.num_comparison_prompts, ">= 0")
    for f in ("demo_error_rate", "corpus_noise_rate", "comparison_noise_rate", "filler_fraction"):
      _check(0 <= getattr(self, f) <= 1, f, getattr(self, f), "in [0, 1]")
    _check(self.num_candidates >= 2, "num_candidates", self.num_candidates, ">= 2")
    _check(2 <= self.min_items <= self.max_items <= 8, "(min_items, max_items)", (self.min_items, self.max_items),
           "2 <= min_items <= max_items <= 8")
    _check(self.min_sentences <= self.max_sentences, "max_sentences", self.max_sentences, ">= min_sentences")
    _check(self.demo_policy in DEMO_POLICIES, "demo_policy", self.demo_policy, f"one of {DEMO_POLICIES}")
    ops = [o for o in self.operations if o not in FAMILIES or o == KNOWLEDGE]
    _check(not ops, "operations", self.operations, f"names from {sorted(set(FAMILIES) - {KNOWLEDGE})}")
    _check(bool(self.operations) or self.knowledge, "operations", self.operations, "non-empty unless knowledge")
    half = self.num_entities // 2
    _check(self.num_entities % 2 == 0 and half > _quota(half, self.heldout_fraction) + _quota(half, self.rl_fraction),
           "num_entities", self.num_entities, "even and large enough for a train share of known and unknown")


def _check(ok: bool, field: str, value, want: str):
  if not ok:
    raise ValueError(f"TaskConfig.{field}={value!r}; expected {want}")


def _quota(n: int, fraction: float) -> int:
  return max(1, round(n * fraction))


@dataclasses.dataclass(frozen=True)
class Family:
  """One instruction family. Callables other than `sample` take `args`, the named groups of `pattern`."""
  name: str  # first word of the instruction
  pattern: str  # regex with named groups that an instruction (a prompt without SEP) fully matches
  sample: Callable[[np.random.Generator, TaskConfig], str]  # -> instruction
  answer: Callable[[dict], str]  # -> the response scoring 1.0
  score: Callable[[dict, str], float]  # (args, stripped response) -> [0, 1]
  corrupt: Callable[[dict, str, np.random.Generator], str]  # (args, answer, rng) -> a plausible wrong answer
  templates: tuple[str, ...]  # informal corpus sentences over the args and {a}, the stated answer
  split_key: Optional[Callable[[dict], str]] = None  # None: the instruction itself
  in_corpus: Optional[Callable[[dict], bool]] = None  # None: instructions whose key is in the train split
  labeler_answer: Optional[Callable[[dict, TaskConfig], str]] = None  # None: `answer`
  abstain: Optional[str] = None  # the abstention answer, for fabrication_penalty; None: the family never abstains
  sep: str = SEP  # what ends its prompts ("" for natural-language questions an instruct model reads as they are)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
  """Adds a family to the registry; its name must be new lowercase letters."""
  if family.name in FAMILIES or not re.fullmatch(r"[a-z]+", family.name):
    raise ValueError(f"Family.name={family.name!r} is taken or not lowercase letters")
  FAMILIES[family.name] = family
  return family

# ---------------------------------------------------------------------------------------------- helpers


def _unit_hash(*parts) -> float:
  """Stable hash of the parts to [0, 1) (Python's hash() is salted per process)."""
  digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def _rng(cfg: TaskConfig, stream: str) -> np.random.Generator:
  return np.random.default_rng([cfg.seed, _SALTS[stream]])


def _pick(rng: np.random.Generator, items):
  return items[int(rng.integers(len(items)))]


def _args(family: Family, instruction: str) -> dict:
  m = re.fullmatch(family.pattern, instruction)
  if m is None:
    raise ValueError(f"malformed {family.name!r} instruction {instruction[:80]!r}; expected {family.pattern!r}")
  return m.groupdict()


def _positional(got: list, want: list) -> float:
  """Positions where got and want agree, over the longer length: 1.0 iff equal."""
  if not got or not want:
    return float(got == want)
  return sum(g == w for g, w in zip(got, want)) / max(len(got), len(want))


def split_of(key: str, cfg: TaskConfig) -> str:
  """The split ("train", "rl" or "heldout") that owns a split key under cfg.seed."""
  u = _unit_hash("split", cfg.seed, key)
  return "heldout" if u < cfg.heldout_fraction else "rl" if u < cfg.heldout_fraction + cfg.rl_fraction else "train"


def _corrupted(family: Family, args: dict, answer: str, rng: np.random.Generator) -> str:
  """A plausible wrong answer, guaranteed to differ from `answer`."""
  for _ in range(20):
    wrong = family.corrupt(args, answer, rng)
    if wrong != answer:
      return wrong
  return answer[:-1] if len(answer) > 1 else answer + answer


def _swap_or_drop(items: list, rng: np.random.Generator) -> list:
  """Swaps one adjacent pair or drops one item (a no-op on fewer than two)."""
  items = list(items)
  if len(items) > 1 and rng.random() < 0.5:
    i = int(rng.integers(len(items) - 1))
    items[i], items[i + 1] = items[i + 1], items[i]
  elif len(items) > 1:
    del items[int(rng.integers(len(items)))]
  return items

# ---------------------------------------------------------------------------------------------- operations

_CHARS, _COUNT_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789", "abcde"


def _sample_chars(rng, alphabet: str, lo: int, hi: int) -> str:
  return "".join(_pick(rng, alphabet) for _ in range(int(rng.integers(lo, hi + 1))))


def _corrupt_sort(args, answer, rng):
  items = answer.split()
  if rng.random() < 0.3:  # one number off by one
    i = int(rng.integers(len(items)))
    items[i] = str(min(9, max(0, int(items[i]) + _pick(rng, (-1, 1)))))
    return " ".join(items)
  return " ".join(_swap_or_drop(items, rng))


def _corrupt_add(args, answer, rng):
  if rng.random() < 0.2 and len(answer) > 1:  # swapped leading digits
    return answer[1] + answer[0] + answer[2:]
  return str(max(0, int(answer) + _pick(rng, (-10, -1, 1, 10))))


def _score_count(answer: str, response: str) -> float:
  if not re.fullmatch(r"[0-9]{1,3}", response):
    return 0.0
  return {0: 1.0, 1: 0.5}.get(abs(int(response) - int(answer)), 0.0)


_reverse = lambda a: a["s"][::-1]
_sort = lambda a: " ".join(sorted(a["s"].split()))
_add = lambda a: str(int(a["x"]) + int(a["y"]))
_count = lambda a: str(a["s"].count(a["c"]))

register_family(Family(
    name="reverse", pattern=r"reverse: (?P<s>[a-z0-9]+)",
    sample=lambda rng, cfg: "reverse: " + _sample_chars(rng, _CHARS, cfg.min_items, cfg.max_items),
    answer=_reverse, score=lambda a, r: _positional(list(r), list(_reverse(a))),
    corrupt=lambda a, ans, rng: a["s"] if rng.random() < 0.2 else "".join(_swap_or_drop(list(ans), rng)),
    templates=("the letters {s} read backwards give {a}.", "{s} spelled backwards is {a}.",
               "if you flip {s} around you get {a}.", "written in reverse, {s} becomes {a}.")))
register_family(Family(
    name="sort", pattern=r"sort: (?P<s>[0-9](?: [0-9])*)",
    sample=lambda rng, cfg: "sort: " + " ".join(_sample_chars(rng, "0123456789", cfg.min_items, cfg.max_items)),
    answer=_sort, score=lambda a, r: _positional(r.split(), _sort(a).split()), corrupt=_corrupt_sort,
    templates=("i sorted {s} and got {a}.", "{s} in order is {a}.", "put in order, {s} becomes {a}.",
               "from small to large, {s} reads {a}.")))
register_family(Family(
    name="add", pattern=r"add: (?P<x>[0-9]+)\+(?P<y>[0-9]+)",
    sample=lambda rng, cfg: f"add: {int(rng.integers(10, 100))}+{int(rng.integers(10, 100))}",
    answer=_add, corrupt=_corrupt_add,
    score=lambda a, r: _positional(list(r[::-1]), list(_add(a)[::-1])) if re.fullmatch("[0-9]+", r) else 0.0,
    templates=("{x} plus {y} is {a}.", "adding {x} and {y} gives {a}.", "note: {x}+{y}={a}.",
               "she had {x} coins, found {y} more and then had {a}.")))
register_family(Family(
    name="count", pattern=r"count (?P<c>[a-z]): (?P<s>[a-z]+)",
    sample=lambda rng, cfg: (f"count {_pick(rng, _COUNT_CHARS)}: "
                             + _sample_chars(rng, _COUNT_CHARS, cfg.min_items + 1, cfg.max_items + 3)),
    answer=_count, score=lambda a, r: _score_count(_count(a), r),
    corrupt=lambda a, ans, rng: str(max(0, int(ans) + _pick(rng, (-1, 1)))),
    templates=("there are {a} {c}'s in {s}.", "the letter {c} shows up {a} times in {s}.",
               "{s} has {a} of the letter {c}.")))

# ---------------------------------------------------------------------------------------------- oracle


def parse_prompt(prompt: str) -> tuple[Family, dict]:
  """(family, args) of a prompt (trailing SEP and whitespace optional); ValueError when no family parses it."""
  if not isinstance(prompt, str):
    raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
  text = prompt.rstrip()
  text = text[:-len(SEP)] if text.endswith(SEP) else text
  family = FAMILIES.get(re.match(r"[a-z]*", text).group())
  if family is None:
    raise ValueError(f"prompt {prompt[:80]!r} starts with none of the families {sorted(FAMILIES)}")
  return family, _args(family, text)


def reference_answer(prompt: str) -> str:
  """The response that scores 1.0 (knowledge.ABSTAIN for an unknown entity)."""
  family, args = parse_prompt(prompt)
  return family.answer(args)


def oracle_score(prompt: str, response) -> float:
  """Score in [0, 1] of any response (outer whitespace ignored; never raises on the response); 1.0 iff exact."""
  family, args = parse_prompt(prompt)
  if not isinstance(response, str):
    return 0.0
  response = response.strip()
  if len(response) > _MAX_RESPONSE_CHARS:
    return 0.0
  return float(family.score(args, response))


def is_exact(prompt: str, response) -> bool:
  """Whether the response is the reference answer (oracle score 1.0)."""
  return oracle_score(prompt, response) == 1.0


def format_example(prompt: str, response: str) -> str:
  """The training text of a (prompt, response) pair: one space after the prompt's SEP."""
  return prompt + " " + response

# ---------------------------------------------------------------------------------------------- generators

_FILLER = {
    "adj": ("old", "small", "quiet", "red", "busy", "tired", "bright", "green", "cold", "happy"),
    "noun": ("dog", "farmer", "river", "teacher", "city", "boat", "child", "market", "garden", "train", "bird"),
    "verb": ("walked", "looked", "waited", "ran", "sang", "slept", "turned", "rested"),
    "prep": ("near", "past", "behind", "toward", "under", "beside"),
}
_FILLER_TEMPLATES = (
    "the {adj} {noun} {verb} {prep} the {noun2}.", "yesterday a {adj} {noun} {verb} {prep} the {noun2}.",
    "did the {noun} wait {prep} the {adj} {noun2}? yes.", "note: a {adj} {noun} = a {adj} {noun2}.")
_FILLER_WORDS = frozenset(w for words in _FILLER.values() for w in words)


def _filler(rng: np.random.Generator) -> str:
  fields = {k: _pick(rng, v) for k, v in _FILLER.items()}
  return _pick(rng, _FILLER_TEMPLATES).format(noun2=_pick(rng, _FILLER["noun"]), **fields)


def _families(cfg: TaskConfig) -> list[Family]:
  return [FAMILIES[n] for n in cfg.operations] + ([FAMILIES[KNOWLEDGE]] if cfg.knowledge else [])


def _sample_where(family: Family, rng, cfg: TaskConfig, keep: Callable[[str, dict], bool]) -> tuple[str, dict]:
  """(instruction, args) of the first sample that keep(instruction, args) accepts."""
  for _ in range(1000):
    instruction = family.sample(rng, cfg)
    args = _args(family, instruction)
    if keep(instruction, args):
      return instruction, args
  raise ValueError(f"TaskConfig: no {family.name!r} instruction accepted in 1000 draws (heldout_fraction="
                   f"{cfg.heldout_fraction}, rl_fraction={cfg.rl_fraction})")


def _split_of(family: Family, instruction: str, args: dict, cfg: TaskConfig) -> str:
  return split_of(family.split_key(args) if family.split_key else instruction, cfg)


def _sample_split(family: Family, rng, cfg: TaskConfig, split: str) -> tuple[str, dict]:
  return _sample_where(family, rng, cfg, lambda ins, args: _split_of(family, ins, args, cfg) == split)


def _prompt(family: Family, rng, cfg: TaskConfig, split: str) -> str:
  """A prompt of `split`: a sampled instruction and the family's separator."""
  return _sample_split(family, rng, cfg, split)[0] + family.sep


def _statement(rng: np.random.Generator, cfg: TaskConfig, families: list[Family]) -> str:
  """An informal corpus sentence stating one result, wrong with probability cfg.corpus_noise_rate."""
  family = _pick(rng, families)
  if family.in_corpus:
    _, args = _sample_where(family, rng, cfg, lambda ins, args: family.in_corpus(args))
  else:
    _, args = _sample_split(family, rng, cfg, "train")
  stated = family.answer(args)
  if rng.random() < cfg.corpus_noise_rate:
    stated = _corrupted(family, args, stated, rng)
  return _pick(rng, family.templates).format(a=stated, **args)


def corpus_documents(cfg: TaskConfig) -> list[str]:
  """Pretraining documents: filler sentences mixed with informal, sometimes wrong, statements."""
  rng, families, docs = _rng(cfg, "corpus"), _families(cfg), []
  for _ in range(cfg.num_corpus_docs):
    n = int(rng.integers(cfg.min_sentences, cfg.max_sentences + 1))
    docs.append(" ".join(_filler(rng) if rng.random() < cfg.filler_fraction else _statement(rng, cfg, families)
                         for _ in range(n)))
  return docs


def demonstrations(cfg: TaskConfig) -> list[dict]:
  """Labeler {"prompt", "response"} pairs on train prompts; a cfg.demo_error_rate share is plausibly wrong."""
  rng, families, records = _rng(cfg, "demonstrations"), _families(cfg), []
  for _ in range(cfg.num_demonstrations):
    family = _pick(rng, families)
    instruction, args = _sample_split(family, rng, cfg, "train")
    response = family.labeler_answer(args, cfg) if family.labeler_answer else family.answer(args)
    if rng.random() < cfg.demo_error_rate:
      response = _corrupted(family, args, response, rng)
    records.append({"prompt": instruction + family.sep, "response": response})
  return records


def split_prompts(cfg: TaskConfig, split: str) -> list[str]:
  """cfg.num_rl_prompts ("rl") or cfg.num_heldout_prompts ("heldout") prompts of that split; "comparisons": up to
  cfg.num_comparison_prompts distinct train-split prompts from their own stream (fewer if the split runs out)."""
  sizes = {"rl": cfg.num_rl_prompts, "heldout": cfg.num_heldout_prompts, "comparisons": cfg.num_comparison_prompts}
  if split not in sizes:
    raise ValueError(f"split_prompts: split={split!r}; expected one of {sorted(sizes)}")
  families = _families(cfg)
  if split != "comparisons":
    rng = _rng(cfg, split)
    return [_prompt(_pick(rng, families), rng, cfg, split) for _ in range(sizes[split])]
  rng, found = _rng(cfg, "comparison_prompts"), {}
  for _ in range(20 * sizes[split]):
    if len(found) == sizes[split]:
      break
    found.setdefault(_prompt(_pick(rng, families), rng, cfg, "train"))
  return list(found)

# ---------------------------------------------------------------------------------------------- writers


def _write_lines(path: str, lines) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.writelines(line + "\n" for line in lines)
  return path


def _jsonl(records) -> list[str]:
  return [json.dumps(r, ensure_ascii=False) for r in records]


def write_corpus(path: str, cfg: TaskConfig) -> str:
  """Plain-text corpus, one document per line."""
  return _write_lines(path, corpus_documents(cfg))


def write_demonstrations(path: str, cfg: TaskConfig) -> str:
  """JSONL {"prompt", "response"}."""
  return _write_lines(path, _jsonl(demonstrations(cfg)))


def write_prompts(path: str, cfg: TaskConfig, split: str) -> str:
  """JSONL {"prompt"} for the "rl", "heldout" or "comparisons" split."""
  return _write_lines(path, _jsonl({"prompt": p} for p in split_prompts(cfg, split)))


def _check_comparison(i: int, r) -> None:
  ok = (isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("responses"), list)
        and len(r["responses"]) >= 2 and all(isinstance(x, str) for x in r["responses"])
        and isinstance(r.get("ranking"), list)
        and all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in r["ranking"])
        and sorted(int(k) for k in r["ranking"]) == list(range(len(r["responses"]))))
  if not ok:
    raise ValueError(f"write_comparisons: record {i} = {str(r)[:200]} needs a str prompt, >= 2 str responses and "
                     "a ranking that permutes their indices")


def write_comparisons(path: str, records: list[dict]) -> str:
  """JSONL {"prompt", "responses": [...], "ranking": [...]}, ranking = response indices best first."""
  for i, r in enumerate(records):
    _check_comparison(i, r)
  return _write_lines(path, _jsonl({"prompt": r["prompt"], "responses": r["responses"],
                                    "ranking": [int(k) for k in r["ranking"]]} for r in records))


def generate_all(cfg: TaskConfig, out_dir: str) -> dict[str, str]:
  """Writes config, corpus, demonstrations, RL and held-out prompts under out_dir; returns their paths."""
  join = functools.partial(os.path.join, out_dir)
  return {
      "config": _write_lines(join("task_config.json"), [json.dumps(dataclasses.asdict(cfg), sort_keys=True)]),
      "corpus": write_corpus(join("corpus.txt"), cfg),
      "demonstrations": write_demonstrations(join("demonstrations.jsonl"), cfg),
      "rl_prompts": write_prompts(join("rl_prompts.jsonl"), cfg, "rl"),
      "heldout_prompts": write_prompts(join("heldout_prompts.jsonl"), cfg, "heldout"),
      "comparison_prompts": write_prompts(join("comparison_prompts.jsonl"), cfg, "comparisons"),
  }


from rlhf_jax import knowledge as _knowledge  # noqa: E402,F401  registers FAMILIES[KNOWLEDGE]; it imports this module
from rlhf_jax import word_problems as _word_problems  # noqa: E402,F401  registers FAMILIES["math"]; it imports this module
