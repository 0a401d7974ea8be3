"""Chat templates: finding a model's Jinja template and rendering it in a sandbox.

Owns: where a Hugging Face directory keeps its template, the sandboxed Jinja environment with
the helpers Hugging Face templates use (`raise_exception`, `strftime_now`, a non-escaping
`tojson`, loop controls, `{% generation %}`), and rendering errors as InvalidRequestError.
Must not import torch nor anything from kvrelay above `errors`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvrelay.errors import CorruptModelError, InvalidRequestError

ChatTemplate = jinja2.Template


def find_hf_chat_template(path: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The template of a Hugging Face directory: `chat_template` in tokenizer_config.json (a
    string, or named templates where "default" wins), else chat_template.jinja / .json."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = by_name.get("default") or next(iter(by_name.values()), None)
    if isinstance(template, str):
        return template
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        found = json.loads((path / "chat_template.json").read_text(encoding="utf-8"))
        if isinstance(found, dict) and isinstance(found.get("chat_template"), str):
            return str(found["chat_template"])
    return None


def compile_chat_template(source: str) -> ChatTemplate:
    """Compile in an immutable sandbox, configured as transformers configures it."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise CorruptModelError(f"the model's chat template does not compile: {exc}") from exc


def render_chat_template(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    variables: Mapping[str, Any],
) -> str:
    """Render; a template that rejects the conversation raises InvalidRequestError."""
    try:
        rendered: str = template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as exc:  # raise_exception, sandbox violations, bad access
        raise InvalidRequestError(f"chat template rejected the conversation: {exc}") from exc
    return rendered


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used by some templates to mark assistant
    text for training masks) renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 - jinja reads this class attribute

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        body: list[jinja2.nodes.Node] = parser.parse_statements(
            ("name:endgeneration",), drop_needle=True
        )
        return body


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own filter HTML-escapes; templates expect plain JSON, as transformers renders it.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
