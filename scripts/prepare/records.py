"""prepare's record formats: detects a source's format, maps custom field names, and normalizes every
record into one of the formats mlx-lm reads: {"text"}, {"prompt", "completion"} or {"messages"[, "tools"]}.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.errors import PipelineError

from prepare import toolcalls

INPUT_FORMATS = ("text", "completions", "alpaca", "sharegpt", "messages")
CHAT_INPUTS = ("alpaca", "sharegpt", "messages")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


def detect_format(records: list[dict], where: str) -> str:
    """The input format of a source, from the fields of its first records."""
    sample = records[:100]
    for name, test in (
        ("messages", lambda r: isinstance(r.get("messages"), list)),
        ("sharegpt", lambda r: isinstance(r.get("conversations"), list)),
        ("alpaca", lambda r: "instruction" in r and "output" in r),
        ("completions", lambda r: "prompt" in r and "completion" in r),
        ("text", lambda r: "text" in r),
    ):
        if sample and all(test(r) for r in sample):
            return name
    fields = sorted({k for r in sample for k in r})
    raise PipelineError(
        f"unknown record format (fields found: {', '.join(fields) or 'none'})",
        where=where,
        fix="set data.format (text, completions, alpaca, sharegpt, messages) and map your columns with "
        "data.field_map, e.g. {prompt: question, completion: answer}",
    )


class Located(list):
    """Records with where each came from ("data/x.jsonl:12"), so an error can name the line."""

    def __init__(self, records=(), origins: list[str] | None = None):
        super().__init__(records)
        self.origins = list(origins) if origins is not None else []

    def __add__(self, other):
        return Located([*self, *other], [*self.origins, *origins_of(other)])


def origins_of(records: list) -> list[str]:
    return getattr(records, "origins", None) or []


def origin(records: list, index: int, where: str) -> str:
    found = origins_of(records)
    return found[index] if index < len(found) else f"{where} record {index + 1}"


def apply_field_map(records: list[dict], field_map: dict[str, str]) -> list[dict]:
    """Rename the user's columns to the standard names: field_map is {standard: column}."""
    if not field_map:
        return records
    columns = {k for r in records for k in r}
    for standard, column in field_map.items():
        if column not in columns:
            raise PipelineError(
                f"data.field_map maps {standard} to the column '{column}', which no record has",
                where="data.field_map",
                fix=f"use one of the columns found: {', '.join(sorted(columns)) or 'none'}",
            )
    renames = {column: standard for standard, column in field_map.items()}
    return Located([{renames.get(k, k): v for k, v in r.items()} for r in records], origins_of(records))


def normalize(records: list[dict], fmt: str, where: str) -> tuple[str, list[dict]]:
    """(kind, records) where kind is text, completions or messages."""
    convert = {
        "text": _from_text,
        "completions": _from_completions,
        "alpaca": _from_alpaca,
        "sharegpt": _from_sharegpt,
        "messages": _from_messages,
    }[fmt]
    out = []
    for index, record in enumerate(records):
        try:
            out.append(convert(record))
        except (KeyError, TypeError, ValueError) as exc:
            raise PipelineError(
                f"the record is not valid {fmt}: {_describe(exc)}",
                where=origin(records, index, where),
                fix="fix the record, or set data.format / data.field_map to match your fields",
            ) from exc
    kind = {"text": "text", "completions": "completions"}.get(fmt, "messages")
    return kind, Located(out, origins_of(records))


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing required field {exc.args[0]!r}"
    return str(exc)


def _string(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise TypeError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _from_text(record: dict) -> dict:
    return {"text": _string(record, "text")}


def _from_completions(record: dict) -> dict:
    return {"prompt": _string(record, "prompt"), "completion": _string(record, "completion")}


def _from_alpaca(record: dict) -> dict:
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": _string(record, "system")})
    for turn in record.get("history") or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise ValueError("history must be a list of [instruction, response] pairs")
        messages += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
    instruction = _string(record, "instruction")
    extra = record.get("input") or ""
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _string(record, "output")}]
    return {"messages": messages}


def _from_sharegpt(record: dict) -> dict:
    messages = [{"role": "system", "content": _string(record, "system")}] if record.get("system") else []
    for turn in record["conversations"]:
        source = turn["from"]
        if source not in SHAREGPT_ROLES:
            raise ValueError(f"unknown speaker {source!r} (known: {', '.join(SHAREGPT_ROLES)})")
        if source == "function_call":
            messages.append(
                {"role": "assistant", "content": "", "tool_calls": toolcalls.parse_calls(_string(turn, "value"))}
            )
        else:
            messages.append({"role": SHAREGPT_ROLES[source], "content": _string(turn, "value")})
    return _with_tools({"messages": _check_messages(messages)}, record)


def _from_messages(record: dict) -> dict:
    messages = [_message(m) for m in record["messages"]]
    return _with_tools({"messages": _check_messages(messages)}, record)


def _message(message: dict) -> dict:
    """A chat message with tool calls in one form: OpenAI `tool_calls` (or the older `function_call`)."""
    role = "tool" if message["role"] == "function" else message["role"]
    out = {"role": role, "content": _content_text(message.get("content"))}
    calls = message.get("tool_calls") or ([message["function_call"]] if message.get("function_call") else None)
    if calls:
        out["tool_calls"] = toolcalls.normalize_calls(calls)
    return {**out, **{k: message[k] for k in ("name", "tool_call_id") if message.get(k) is not None}}


def _content_text(content) -> str:
    """A message's text; OpenAI content parts ([{"type": "text", "text": ...}]) are joined."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    if content is not None and not isinstance(content, str):
        raise TypeError(f"message content must be a string or a list of text parts, got {type(content).__name__}")
    return content or ""


def _with_tools(out: dict, record: dict) -> dict:
    if record.get("tools"):
        out["tools"] = toolcalls.normalize_tools(record["tools"])
    return out


def _check_messages(messages: list[dict]) -> list[dict]:
    if not messages:
        raise ValueError("no messages")
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise TypeError("message content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message to learn from")
    return messages


def output_kind(kinds: Iterable[str]) -> str:
    """One output format for all sources: mlx-lm reads one format per file."""
    kinds = set(kinds)
    if len(kinds) == 1:
        return kinds.pop()
    if "text" in kinds:
        raise PipelineError(
            f"cannot mix plain-text sources with {', '.join(sorted(kinds - {'text'}))} sources",
            where="data.source",
            fix="prepare them as separate experiments, or give all sources the same kind of records",
        )
    return "messages"


def completions_to_messages(record: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    }
