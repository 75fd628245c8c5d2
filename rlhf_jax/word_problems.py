"""Arithmetic word problems for pretrained instruct models: the `math` family of the embedded task (rlhf_jax/tasks.py).

  prompt   "math: Ana has 7 apples and buys 5 more. How many apples does Ana have now?"
  answer   "12"; labeler demonstration "7 + 5 = 12"; an instruct model may say "Ana has 7 + 5 = 12 apples."

A response scores 1.0 when the last number it states equals the answer and 0.0 otherwise (GSM8K's convention:
free-form text, one exact check); a response without a number scores 0. Questions are one operation (+, -, ×) on two
small whole numbers, in QUESTIONS' templates over NAMES and OBJECTS; the instruction's question is parsed back with
the template regexes, so the oracle needs no stored answer. Labelers write the one equation that answers it; a wrong
demonstration (TaskConfig.demo_error_rate) states a nearby wrong result.

Importing this module registers the family as tasks.FAMILIES[NAME]; tasks imports it last (as it does knowledge), so
`TaskConfig(operations=("math",))` works wherever tasks is loaded.
"""
from __future__ import annotations

import functools
import re

import numpy as np

from rlhf_jax import tasks

NAME = "math"  # the family's name: every instruction starts with "math: "
NAMES = ("Ana", "Ben", "Carla", "Dan", "Eva", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kim", "Leo", "Maya", "Nora",
         "Omar", "Priya", "Sam", "Tara", "Victor", "Yuki")
OBJECTS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cookies", "cards", "shells", "stamps")
# (operation, question): {name}, {obj}, {x}, {y} placeholders; the answer is x op y
QUESTIONS = (
    ("+", "{name} has {x} {obj} and buys {y} more. How many {obj} does {name} have now?"),
    ("+", "{name} found {x} {obj} on Monday and {y} {obj} on Tuesday. How many {obj} did {name} find in total?"),
    ("-", "{name} had {x} {obj} and gave {y} of them away. How many {obj} does {name} have left?"),
    ("-", "There are {x} {obj} in a box. {name} takes {y} of them. How many {obj} are left in the box?"),
    ("*", "{name} has {x} bags with {y} {obj} in each bag. How many {obj} does {name} have?"),
)
RANGES = {"+": ((2, 40), (2, 40)), "-": ((10, 50), (2, 9)), "*": ((2, 9), (2, 9))}  # inclusive (x, y) ranges
_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


@functools.lru_cache(maxsize=None)
def _question_regexes() -> tuple[tuple[str, re.Pattern], ...]:
  """(operation, compiled regex) per question template; a repeated placeholder must repeat its first value."""
  out = []
  for op, template in QUESTIONS:
    seen, parts = set(), []
    for literal, field in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
      parts.append(re.escape(literal))
      if field:
        group = {"name": "[A-Z][a-z]+", "obj": "[a-z]+", "x": "[0-9]+", "y": "[0-9]+"}[field]
        parts.append(f"(?P={field})" if field in seen else f"(?P<{field}>{group})")
        seen.add(field)
    out.append((op, re.compile("".join(parts))))
  return tuple(out)


def solve(question: str) -> tuple[str, int, int, int]:
  """(operation, x, y, answer) of a question in one of QUESTIONS' forms; ValueError for any other text."""
  for op, regex in _question_regexes():
    m = regex.fullmatch(question)
    if m:
      x, y = int(m["x"]), int(m["y"])
      return op, x, y, _OPS[op](x, y)
  raise ValueError(f"math question {question[:80]!r} matches none of the {len(QUESTIONS)} word-problem templates")


def last_number(response: str) -> float | None:
  """The last number a response states (thousands commas dropped), or None when it states none."""
  found = _NUMBER.findall(response)
  return float(found[-1].replace(",", "")) if found else None


def _sample(rng: np.random.Generator, cfg: tasks.TaskConfig) -> str:
  op, template = tasks._pick(rng, QUESTIONS)
  (xlo, xhi), (ylo, yhi) = RANGES[op]
  x, y = int(rng.integers(xlo, xhi + 1)), int(rng.integers(ylo, yhi + 1))
  return f"{NAME}: " + template.format(name=tasks._pick(rng, NAMES), obj=tasks._pick(rng, OBJECTS), x=x, y=y)


def _score(args: dict, response: str) -> float:
  stated = last_number(response)
  return float(stated is not None and stated == solve(args["q"])[3])


def _equation(args: dict, result: int | None = None) -> str:
  op, x, y, answer = solve(args["q"])
  return f"{x} {op.replace('*', 'x')} {y} = {answer if result is None else result}"


def _corrupt(args: dict, response: str, rng: np.random.Generator) -> str:
  """A plausible wrong demonstration: the equation with its result off by a small amount (never below 0)."""
  answer = solve(args["q"])[3]
  return _equation(args, max(0, answer + tasks._pick(rng, (-10, -2, -1, 1, 2, 10))))


FAMILY = tasks.register_family(tasks.Family(
    name=NAME, pattern=NAME + r": (?P<q>[A-Z].*\?)", sample=_sample, sep="",
    answer=lambda args: str(solve(args["q"])[3]), score=_score, corrupt=_corrupt,
    templates=("{q} The answer is {a}.", "{q} I worked it out: {a}."),
    labeler_answer=lambda args, cfg: _equation(args)))
