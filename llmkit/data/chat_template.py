"""Chat templates: finding a Hugging Face model's template and rendering a prompt through it.

A template is Jinja code from a downloaded model directory, so it is compiled in jinja2's
``ImmutableSandboxedEnvironment``: it cannot reach Python internals (``''.__class__``,
``__globals__``) nor mutate the values it is given (``messages.append``); what it tries is a
:class:`LLMKitError`. The environment otherwise matches what ``transformers`` gives templates
(``trim_blocks``, ``lstrip_blocks``, ``{% break %}``/``{% continue %}``, a ``tojson`` that keeps
non-ASCII text, ``raise_exception`` and ``strftime_now``), so a prompt renders as
``apply_chat_template(..., tokenize=False, add_generation_prompt=True)`` renders it.

jinja2 is imported when a template is first compiled: most runs never render one.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import LLMKitError

if TYPE_CHECKING:
    from jinja2 import Template

CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""The file newer ``transformers`` versions write the template to, beside ``tokenizer_config.json``."""

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
"""The Hugging Face tokenizer settings file (special token strings, ``chat_template``)."""


def read_chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> tuple[str, Path] | None:
    """(template, the file it came from) of the model in ``directory``, whose ``tokenizer_config.json``
    holds ``tokenizer_config`` ({} without one); None if it has no template.

    ``chat_template.jinja`` wins over ``tokenizer_config.json``'s ``chat_template`` (as in
    ``transformers``); the latter is a string, or a list of ``{"name", "template"}`` of which
    the one named ``default`` is taken (a list without one counts as no template).
    """
    jinja_file = directory / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8"), jinja_file
        except UnicodeDecodeError as e:
            raise LLMKitError(f"{jinja_file} is not UTF-8 text ({e}): it should hold the chat template") from None
    config_file = directory / TOKENIZER_CONFIG_FILE
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise LLMKitError(
            f"{config_file}: chat_template must be a string or a list of {{'name', 'template'}} objects, not "
            f"{type(template).__name__}; fix it or delete the key"
        )
    return (template, config_file) if template else None


def compile_chat_template(template: str, source: Path) -> Template:
    """``template`` compiled in the sandbox; ``source`` (the file it came from) is named by its errors,
    including the ``raise_exception(message)`` the template may call."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: object) -> None:
        raise LLMKitError(f"the chat template in {source} refused the conversation: {_one_line(str(message))}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise LLMKitError(f"the chat template in {source} is not valid Jinja ({_one_line(str(e))}): fix it") from None


def render_user_prompt(template: Template, source: Path, prompt: str, bos_token: str, eos_token: str) -> str:
    """``prompt`` as the one user message of a conversation, rendered by ``template`` (compiled by
    :func:`compile_chat_template` from ``source``) with the assistant's turn opened after it."""
    return _render(template, source, [{"role": "user", "content": prompt}], True, bos_token, eos_token)


def assistant_turn_end(template: Template, source: Path, bos_token: str, eos_token: str) -> str:
    """The text ``template`` writes after an assistant message's content, which ends its turn
    (``<|eot_id|>`` for Llama 3, ``<|im_end|>`` and a newline for Qwen)."""
    answer = "\x00answer\x00"
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": answer}]
    text = _render(template, source, messages, False, bos_token, eos_token)
    return text[text.rindex(answer) + len(answer):] if answer in text else ""


def _render(template: Template, source: Path, messages: list[dict[str, str]], add_generation_prompt: bool,
            bos_token: str, eos_token: str) -> str:
    try:
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token,
        )
    except LLMKitError:
        raise
    except Exception as e:  # the template is foreign code: whatever it raises is its error
        raise LLMKitError(
            f"the chat template in {source} failed to render a prompt ({type(e).__name__}: {_one_line(str(e))}); "
            "fix the template or turn the chat_template option off"
        ) from None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """``transformers``' ``tojson``: plain JSON, non-ASCII kept (jinja's own escapes HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    """The current local time formatted (templates that state today's date call it)."""
    return datetime.now().strftime(format)


def _one_line(message: str) -> str:
    return " ".join(message.split())
