"""Chat templates: a checkpoint's jinja2 `chat_template` rendered the way transformers' apply_chat_template does
(sandboxed, trim_blocks + lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`)."""
from __future__ import annotations

import datetime
import functools
import json


@functools.lru_cache(maxsize=8)
def _compile(template: str):
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(x, indent=indent,
                                                                                   ensure_ascii=ensure_ascii)
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def render(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True, where: str = "chat_template") -> str:
  """The template applied to `messages`; a template that fails to parse or raises is a ValueError naming `where`."""
  import jinja2
  try:
    return _compile(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                     add_generation_prompt=add_generation_prompt)
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(f"{where}: chat_template failed: {e}") from e
