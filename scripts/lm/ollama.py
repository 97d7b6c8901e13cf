"""The Ollama export: a Modelfile whose Go TEMPLATE comes from the chat template prepare used.

Ollama formats a chat with a Go text/template over .Messages, not with the Jinja chat template the
model was trained on. infer_template_spec renders probe conversations through the Jinja template
(sandboxed the way prepare and transformers do), splits the output into a prefix and a suffix around
each role's content, the generation prompt, a leading text and the default system prompt, and checks
that this reproduces other conversations exactly; go_template writes the Go template from it.

How the pieces map onto Ollama:
- SYSTEM: Ollama inserts the Modelfile's SYSTEM as the first message when a request has no system
  message (server/routes.go), so the Go template never hard-codes a system prompt. A default the Jinja
  template injects (SmolLM2's "You are a helpful AI assistant named SmolLM...") becomes the SYSTEM line;
  the Go rendering of [SYSTEM] + messages then equals the Jinja rendering of the messages alone.
- The generation prompt follows the last message unless that is an assistant message, which is left
  open (no suffix) for Ollama to continue, the way Ollama's own templates use $last.
- Tool results: a template that writes a `tool` message as one block (chatml, Llama 3) gets a tool
  branch; for one that does not, prepare has already moved tool results into the user turn.
- BOS: bos_token defaults to "" because Ollama's runner adds BOS itself when the GGUF asks for it;
  writing it into the template too would double it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.compare import first_difference
from pipeline.errors import PipelineError

from jinja2 import TemplateError

from lm import chat_template, gotemplate

ROLES = ("system", "user", "assistant")
TOOL = "tool"  # a tool result: in the spec only when the template writes it as one block of its own
EOS_PROBE = "ZQEOSPROBEQZ"
SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]+\|>|<｜[^<>｜\s]+｜>|</?[A-Za-z][\w.]*>")
GO_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
INEXPRESSIBLE_FIX = (
    "set prepare.template to chatml, alpaca or llama-3, or to a template that writes each message as one "
    "block (prefix + content + suffix); or set package.ollama.enabled=false"
)


@dataclass(frozen=True)
class TemplateSpec:
    """A chat template as plain text around each message's content."""

    prefixes: dict[str, str]  # role -> text before the content
    suffixes: dict[str, str]  # role -> text after it
    generation_prompt: str  # what add_generation_prompt appends
    leading: str = ""  # once, before everything (e.g. BOS)
    default_system: str | None = None  # the system text the template injects when there is none

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """What the Jinja template renders, rebuilt from the pieces."""
        parts = [self.leading]
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            parts += [self.prefixes["system"], self.default_system, self.suffixes["system"]]
        for message in messages:
            parts += [self.prefixes[message["role"]], message["content"], self.suffixes[message["role"]]]
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)


# --- from the Jinja template to a spec -----------------------------------------------------------


def render_jinja(
    template_source: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    bos_token: str = "",
    eos_token: str | None = None,
) -> str:
    """The chat template rendered as every stage renders it; eos_token None renders a probe that must not appear."""
    special = {"bos_token": bos_token, "eos_token": EOS_PROBE if eos_token is None else eos_token}
    try:
        text = chat_template.render(template_source, messages, add_generation_prompt=add_generation_prompt, **special)
    except TemplateError as exc:
        raise PipelineError(
            f"the chat template fails on a {'/'.join(m['role'] for m in messages)} conversation: {exc}",
            where="prepare.template",
            fix=INEXPRESSIBLE_FIX,
        ) from exc
    if EOS_PROBE in text:
        raise PipelineError(
            "the chat template writes eos_token but none was given",
            where="package.ollama",
            fix="pass eos_token=<the tokenizer's eos token> to infer_template_spec and check_modelfile_template",
        )
    return text


def infer_template_spec(chat_template: str, *, bos_token: str = "", eos_token: str | None = None) -> TemplateSpec:
    """Decompose the chat template into a TemplateSpec, verified on several conversations; PipelineError
    if it is not one."""

    def render(messages, prompt=False):
        return render_jinja(
            chat_template, messages, add_generation_prompt=prompt, bos_token=bos_token, eos_token=eos_token
        )

    s1, u1, a1, u2, a2 = (
        _probe(role, n) for role, n in (("system", 1), ("user", 1), ("assistant", 1), ("user", 2), ("assistant", 2))
    )
    p0, p1, p2, p3, _, p5 = _pieces(render([s1, u1, a1, u2, a2]), [s1, u1, a1, u2, a2])
    q0, q1 = _pieces(render([u1]), [u1])
    unprompted = render([s1, u1])
    generation_prompt = _after(render([s1, u1], True), unprompted, "the generation prompt is not appended at the end")

    suffixes = {"assistant": p5, "user": q1}
    prefixes = {"user": _after(p3, p5, "an assistant turn does not end the same way mid-conversation and at the end")}
    prefixes["assistant"] = _after(
        p2, q1, "a user turn does not end the same way before an assistant turn and at the end"
    )
    suffixes["system"] = _before(p1, prefixes["user"], "a user turn after a system message starts differently")
    head = _before(q0, prefixes["user"], "the first user turn starts differently without a system message")
    leading, default_system = head, None
    if len(head) > len(p0) + len(suffixes["system"]) and head.startswith(p0) and head.endswith(suffixes["system"]):
        # The template injects a default system message. Text before it is attributed to the system
        # prefix, which is right whenever a system message comes first (always, once SYSTEM is set).
        leading, default_system = "", head[len(p0) : len(head) - len(suffixes["system"])]
    prefixes["system"] = _after(p0, leading, "the first system message starts differently")
    tool = _tool_pieces(render, u1, a1, prefixes["assistant"], suffixes["assistant"])
    if tool:
        prefixes[TOOL], suffixes[TOOL] = tool
    spec = TemplateSpec(prefixes, suffixes, generation_prompt, leading, default_system)
    _verify(spec, render)
    return spec


def _tool_pieces(render, user: dict, answer: dict, assistant_prefix: str, assistant_suffix: str):
    """(prefix, suffix) of a tool message between two assistant turns, or None when the template refuses
    tool messages, drops them, or writes them in a way that depends on their neighbours (prepare moves tool
    results into the user turn for such templates, so the data has none)."""
    result, after = _probe(TOOL, 1), _probe("assistant", 2)
    try:
        _, _, between, following, _ = _pieces(render([user, answer, result, after]), [user, answer, result, after])
    except PipelineError:
        return None
    if not (between.startswith(assistant_suffix) and following.endswith(assistant_prefix)):
        return None
    return between[len(assistant_suffix) :], following[: len(following) - len(assistant_prefix)]


def _probe(role: str, n: int) -> dict:
    return {"role": role, "content": f"ZQ{role.upper()}{n}QZ"}


def _pieces(text: str, probes: list[dict]) -> list[str]:
    """The text between the probe contents, which must each appear once and in order."""
    pieces, pos = [], 0
    for probe in probes:
        at = text.find(probe["content"], pos)
        if at < 0 or text.count(probe["content"]) != 1:
            raise _inexpressible("it does not write each message's content once and in order")
        pieces.append(text[pos:at])
        pos = at + len(probe["content"])
    return [*pieces, text[pos:]]


def _after(text: str, prefix: str, why: str) -> str:
    if not text.startswith(prefix):
        raise _inexpressible(why)
    return text[len(prefix) :]


def _before(text: str, suffix: str, why: str) -> str:
    if not text.endswith(suffix):
        raise _inexpressible(why)
    return text[: len(text) - len(suffix)]


def _inexpressible(why: str) -> PipelineError:
    return PipelineError(
        f"the chat template cannot be written as an Ollama template: {why}",
        where="prepare.template",
        fix=INEXPRESSIBLE_FIX,
    )


def _verify(spec: TemplateSpec, render) -> None:
    system, first, answer, second, third = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four.\nAnything else?"},
        {"role": "user", "content": "Two lines:\n- one\n- two"},
        {"role": "user", "content": "Thanks!"},
    )
    conversations = [
        ([first], True),
        ([first], False),
        ([system, first], True),
        ([system, first, answer, second], True),
        ([first, answer, second, answer], False),
        ([first, answer, second], True),
        ([system, first, answer, second, answer, third], True),
    ]
    if TOOL in spec.prefixes:
        result = {"role": TOOL, "content": '{"temperature": 21}'}
        conversations += [([first, answer, result, answer], False), ([system, first, answer, result], True)]
    if spec.default_system is not None:  # the injected default must equal an explicit system message
        conversations.append(([{"role": "system", "content": spec.default_system}, first], True))
    for messages, prompt in conversations:
        expected, got = render(messages, prompt), spec.render(messages, prompt)
        if expected != got:
            at = first_difference(expected, got)
            roles = "/".join(m["role"] for m in messages) + ("+prompt" if prompt else "")
            raise _inexpressible(
                f"rebuilt from per-role pieces, a {roles} conversation differs at character {at} "
                f"({expected[at : at + 30]!r} vs {got[at : at + 30]!r})"
            )


# --- the Go template and the Modelfile -----------------------------------------------------------


def go_template(spec: TemplateSpec) -> str:
    """An Ollama TEMPLATE over .Messages; every literal is a Go string, so trim markers only touch layout."""
    lines = ["{{- /* generated from the training chat template; SYSTEM arrives as the first message */ -}}"]
    if spec.leading:
        lines.append(_go_text(spec.leading))
    lines += ["{{- range $i, $m := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 }}"]
    for n, role in enumerate(r for r in (*ROLES, TOOL) if r in spec.prefixes):
        suffix = _go_text(spec.suffixes[role])
        if role == "assistant" and suffix:  # the last assistant message stays open: Ollama continues it
            suffix = f"{{{{ if not $last }}}}{suffix}{{{{ end }}}}"
        keyword = "if" if n == 0 else "else if"
        lines.append(
            f'{{{{- {keyword} eq $m.Role "{role}" }}}}{_go_text(spec.prefixes[role])}{{{{ $m.Content }}}}{suffix}'
        )
    lines.append("{{- end }}")
    if spec.generation_prompt:
        lines.append(f'{{{{- if and $last (ne $m.Role "assistant") }}}}{_go_text(spec.generation_prompt)}{{{{ end }}}}')
    lines.append("{{- end }}")
    return "\n".join(lines)


def _go_text(text: str) -> str:
    return f"{{{{ {_go_string(text)} }}}}" if text else ""


def _go_string(text: str) -> str:
    chars = [GO_ESCAPES.get(c) or (c if c.isprintable() else f"\\U{ord(c):08x}") for c in text]
    return '"' + "".join(chars) + '"'


def stop_tokens(spec: TemplateSpec, eos_token: str | None) -> list[str]:
    """End-of-turn tokens (special tokens in the assistant suffix), the next turn's opener, and eos.

    The opener is the special tokens of the user prefix (<|im_start|>, as Ollama's own chatml stops do),
    or its first line when it has none (alpaca's "### Instruction:").
    """
    opener = spec.prefixes["user"]
    stops = SPECIAL_TOKEN.findall(spec.suffixes["assistant"])
    stops += SPECIAL_TOKEN.findall(opener) or opener.strip().splitlines()[:1]
    stops += [eos_token] if eos_token else []
    return list(dict.fromkeys(s for s in stops if s.strip()))


def modelfile_text(
    gguf_file: str,
    spec: TemplateSpec,
    *,
    stops: list[str],
    num_ctx: int,
    system: str | None,
    parameters: dict | None = None,
    adapter_file: str | None = None,
    name: str = "Modelfile",
) -> str:
    """The Modelfile: FROM, ADAPTER (a LoRA adapter GGUF on the FROM model, if any), TEMPLATE, SYSTEM (if
    any), one PARAMETER stop per token, num_ctx and the rest. File names are relative to the Modelfile
    (ollama create resolves FROM and ADAPTER so); a bare name gets "./"."""
    lines = [
        f"# Generated by the package stage from the training chat template; ollama create NAME -f {name}",
        f"FROM {_value(_local(gguf_file), 'the GGUF file name')}",
    ]
    if adapter_file:
        lines.append(f"ADAPTER {_value(_local(adapter_file), 'the adapter GGUF file name')}")
    lines.append(f'TEMPLATE """{_checked(go_template(spec), "the Go template")}"""')
    if system:
        lines.append(f'SYSTEM """{_checked(system, "the system prompt (package.ollama.system)")}"""')
    params = [("stop", stop) for stop in stops] + [("num_ctx", int(num_ctx))] + list((parameters or {}).items())
    for name, value in params:
        if not re.fullmatch(r"\w+", name):
            raise PipelineError(
                f"bad Modelfile parameter name {name!r}", where="package.ollama", fix="use letters, digits and _"
            )
        text = str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f"PARAMETER {name} {_value(text, f'the {name} parameter', quote=name == 'stop')}")
    return "\n".join(lines) + "\n"


def _local(file: str) -> str:
    return file if "/" in file else "./" + file


def _value(text: str, what: str, quote: bool = False) -> str:
    """A one-line Modelfile value, quoted when asked or needed; Ollama takes quoted text verbatim (no escapes)."""
    _checked(text, what)
    if not (quote or not text or re.search(r'[\s"]', text)):
        return text
    return f'"""{text}"""' if '"' in text else f'"{text}"'


def _checked(text: str, what: str) -> str:
    """text, if a Modelfile can carry it: Ollama ends a triple-quoted value at the first \"\"\" followed by
    whitespace, and its parser drops characters that are not printable."""
    if '"""' in text or any(not c.isprintable() and c not in "\n\r\t" for c in text):
        raise PipelineError(
            f'{what} contains """ or an unprintable character, which a Modelfile cannot carry',
            where="package.ollama",
            fix="remove them from the text",
        )
    return text


# --- checking the Go template against Jinja ------------------------------------------------------


def render_go(template: str, messages: list[dict], system: str | None) -> str:
    """The prompt Ollama builds for a chat request: SYSTEM inserted, messages collated, template executed."""
    if system and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    collated: list[dict] = []
    for m in messages:  # Ollama merges consecutive messages of one role (template.collate)
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    system_text = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {
        "System": system_text,
        "Messages": collated,
        "Tools": None,
        "Response": "",
        "Think": False,
        "IsThinkSet": False,
    }
    try:
        return gotemplate.render(template, data)
    except gotemplate.GoTemplateError as exc:
        raise PipelineError(
            f"the Ollama template does not execute: {exc}", where="ollama_export", fix="this is a bug in go_template"
        ) from exc


def check_modelfile_template(
    chat_template: str,
    go_tmpl: str,
    system: str | None,
    conversations: list[list[dict]],
    *,
    bos_token: str = "",
    eos_token: str | None = None,
) -> None:
    """Each conversation, as Ollama would send it (with SYSTEM), must render identically through both templates.

    A conversation ending with a user message is compared with the Jinja generation prompt; one ending with
    an assistant message with the Jinja text cut after that message's content (transformers' continue_final_message).
    """
    for n, messages in enumerate(conversations, 1):
        sent = (
            [{"role": "system", "content": system}, *messages]
            if system and messages and messages[0]["role"] != "system"
            else messages
        )
        continued = sent[-1]["role"] == "assistant"
        expected = render_jinja(
            chat_template, sent, add_generation_prompt=not continued, bos_token=bos_token, eos_token=eos_token
        )
        if continued and sent[-1]["content"] in expected:
            expected = expected[: expected.rindex(sent[-1]["content"]) + len(sent[-1]["content"])]
        got = render_go(go_tmpl, messages, system)
        if got != expected:
            at = first_difference(expected, got)
            raise PipelineError(
                f"the Ollama template renders conversation {n} differently from the chat template at character {at}: "
                f"Jinja {expected[at : at + 40]!r}, Go {got[at : at + 40]!r}",
                where="package.ollama",
                fix="if the difference is the template's default system prompt, set package.ollama.system to auto; "
                "otherwise " + INEXPRESSIBLE_FIX,
            )
