"""Chat templates: the model's own jinja template, rendered in a sandbox as transformers does."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


class TemplateError(ValueError):
    pass


def _raise(message):
    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v, indent=None, ensure_ascii=False: json.dumps(v, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render(template: str | None, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    if not template:
        raise TemplateError("the model has no chat template (tokenizer_config.json / chat_template.jinja)")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except TemplateError:
        raise
    except Exception as e:
        raise TemplateError(f"chat template failed: {e}") from e
