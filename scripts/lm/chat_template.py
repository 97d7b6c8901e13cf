"""The one chat-template renderer: every stage that turns a conversation into text (prepare, train,
fuse, quantize's export check and Ollama template, eval) renders it here, with the template the data
contract records, in a Jinja sandbox configured the way transformers configures its own.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pipeline import paths
from pipeline.errors import PipelineError

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def builtin_templates() -> list[str]:
    return sorted(p.stem for p in paths.TEMPLATE_DIR.glob("*.jinja"))


def resolve_template(choice: str, model_template: str | None) -> dict:
    """{"id", "origin", "source"}: the model's own template, a builtin by name, or a Jinja file."""
    if choice == "auto":
        if model_template:
            return {"id": "model", "origin": "model", "source": model_template}
        choice = "chatml"
    if choice in builtin_templates():
        source = (paths.TEMPLATE_DIR / f"{choice}.jinja").read_text(encoding="utf-8")
        return {"id": choice, "origin": "builtin", "source": source}
    path = paths.resolve(choice)
    if path.suffix in (".jinja", ".j2"):
        return {"id": paths.display(path), "origin": "file", "source": read_template_file(path)}
    raise PipelineError(
        f"unknown template '{choice}'",
        where="prepare.template",
        fix=f"use auto, one of {', '.join(builtin_templates())}, or the path of a .jinja file",
    )


def read_template_file(path: Path) -> str:
    """A Jinja chat template file's text, checked to compile; errors name the file (and line)."""
    where = paths.display(path)
    if not path.is_file():
        raise PipelineError(
            "template file not found", where=where, fix="give the path of an existing .jinja file in prepare.template"
        )
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(
            f"the template is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
            where=where,
            fix="re-save it as UTF-8",
        ) from None
    try:
        compile_template(source)
    except PipelineError as exc:
        line = getattr(exc.__cause__, "lineno", None)
        raise PipelineError(exc.what, where=f"{where}:{line}" if line else where, fix=exc.fix) from None
    return source


def special_tokens(tokenizer) -> dict:
    """The template variables for the tokenizer's special tokens (bos_token, eos_token, ...), as
    transformers passes them; a missing BOS or EOS renders as an empty string."""
    special = {k: v for k, v in getattr(tokenizer, "special_tokens_map", {}).items() if isinstance(v, str)}
    return {
        **special,
        "bos_token": getattr(tokenizer, "bos_token", "") or "",
        "eos_token": getattr(tokenizer, "eos_token", "") or "",
    }


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, indent=None):
    return json.dumps(value, ensure_ascii=False, indent=indent)


@functools.lru_cache(maxsize=8)
def compile_template(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise PipelineError(
            f"the chat template does not compile: {exc}", where="prepare.template", fix="fix the Jinja syntax"
        ) from exc


def render(source: str, messages: list[dict], *, tools=None, add_generation_prompt: bool = False, **special) -> str:
    """The template's text for a conversation; raises jinja2.TemplateError when the template refuses it.
    Keys whose value is None are dropped from messages first, as transformers does."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return compile_template(source).render(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **special
    )


def render_chat(template: dict, messages: list[dict], special: dict, tools=None, add_generation_prompt=False) -> str:
    """render() for a template of the data contract ({"id", "source", ...}); a refusal is one clear line."""
    try:
        return render(template["source"], messages, tools=tools, add_generation_prompt=add_generation_prompt, **special)
    except TemplateError as exc:
        raise PipelineError(
            f"the chat template failed on a record: {exc}",
            where=f"template {template['id']}",
            fix="check the template or the record's roles",
        ) from exc


_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_tool_7f3a",
        "description": "probe",
        "parameters": {"type": "object", "properties": {"probe_arg_7f3a": {"type": "string"}}},
    },
}
_PROBE_CALL = {"type": "function", "function": {"name": "probe_call_7f3a", "arguments": {"probe_arg_7f3a": "x"}}}


def template_features(template: dict, special: dict) -> dict[str, bool]:
    """Which tool parts the template shows: {"tools", "tool_calls", "tool_results"}, each found by
    rendering a probe conversation with and without the part and comparing the text."""
    user = {"role": "user", "content": "hi"}
    called = {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}
    result = {"role": "tool", "content": "probe_result_7f3a", "name": "probe_call_7f3a"}

    def shows(messages, marker, tools=None) -> bool:
        try:
            return marker in render(template["source"], messages, tools=tools, **special)
        except TemplateError:  # a template that refuses the part does not show it
            return False

    return {
        "tools": shows([user], "probe_tool_7f3a", tools=[_PROBE_TOOL]),
        "tool_calls": shows([user, called], "probe_call_7f3a"),
        "tool_results": shows([user, called, result, {"role": "assistant", "content": "ok"}], "probe_result_7f3a"),
    }
