"""prepare's tool definitions and tool calls, whatever shape a dataset gives them in, in one form.

Tools arrive as a list of bare function specs ({name, description, parameters}), as OpenAI objects
({"type": "function", "function": {...}}), or as a JSON string of either (ShareGPT function-calling
sets). They are written as OpenAI objects, each `parameters` checked to be a JSON Schema. Calls
arrive as OpenAI `tool_calls`, an older `function_call`, or a ShareGPT `function_call` turn whose
value is a JSON string; they are written as OpenAI `tool_calls` with `arguments` a JSON object.

A chat template that does not render tools or tool calls would silently drop them, so the model
would never see them. `fit_template` moves them where such a template shows them:
- tool definitions into the system prompt (`TOOLS_PREAMBLE`, then one JSON line per tool, in the
  dataset's order), the system message created if the record has none;
- each tool call into the assistant turn's text, as one JSON object {"name": ..., "arguments": {...}}
  per line (the form eval's tool-call metrics read);
- a tool result the template does not show into a user turn, `TOOL_RESULT_PREFIX` first.
"""

from __future__ import annotations

import json

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from lm import tokens

TOOLS_PREAMBLE = (
    "You can call these tools. To call one, answer with one JSON object "
    '{"name": <tool name>, "arguments": {<argument>: <value>}} per call, one per line.\nTools:'
)
TOOL_RESULT_PREFIX = "Tool result:\n"


def _json_value(value, what: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ValueError(f"{what} is a string that is not JSON ({exc})") from None


def normalize_tools(tools) -> list[dict]:
    """[{"type": "function", "function": {"name", "description", "parameters"}}], each schema checked."""
    tools = _json_value(tools, "'tools'")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise ValueError(f"'tools' must be a list of tool definitions (objects), got {type(tools).__name__}")
    return [_normalize_tool(tool, number) for number, tool in enumerate(tools, 1)]


def _normalize_tool(tool: dict, number: int) -> dict:
    spec = tool["function"] if isinstance(tool.get("function"), dict) else tool
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool {number} has no name")
    parameters = _json_value(spec.get("parameters", {"type": "object", "properties": {}}), f"tool {name!r} parameters")
    if not isinstance(parameters, dict):
        raise ValueError(f"tool {name!r}: parameters must be a JSON Schema object, got {type(parameters).__name__}")
    try:
        Draft202012Validator.check_schema(parameters)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.path) or "(top)"
        raise ValueError(f"tool {name!r}: parameters are not a valid JSON Schema at {path}: {exc.message}") from None
    function = {"name": name, "description": str(spec.get("description") or ""), "parameters": parameters}
    return {"type": "function", "function": function}


def parse_calls(text: str) -> list[dict]:
    """The calls of a ShareGPT function_call turn: one JSON object, or a list of them."""
    return normalize_calls(_json_value(text, "the function_call turn"))


def normalize_calls(calls) -> list[dict]:
    """[{"type": "function", "function": {"name", "arguments": {...}}}] from any common call shape."""
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise ValueError("a tool call must be an object {name, arguments} or a list of them")
    return [_normalize_call(call) for call in calls]


def _normalize_call(call) -> dict:
    if not isinstance(call, dict):
        raise ValueError(f"a tool call must be an object, got {type(call).__name__}")
    spec = call["function"] if isinstance(call.get("function"), dict) else call
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a tool call has no function name")
    arguments = _json_value(spec.get("arguments", spec.get("parameters", {})), f"the arguments of {name!r}")
    if isinstance(arguments, str):  # encoded twice, as some exported datasets have it
        arguments = _json_value(arguments, f"the arguments of {name!r}")
    if not isinstance(arguments, dict):
        raise ValueError(f"the arguments of {name!r} must be a JSON object, got {type(arguments).__name__}")
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"id": call["id"], **out} if isinstance(call.get("id"), str) else out


def tools_text(tools: list[dict]) -> str:
    lines = [json.dumps(tool["function"], ensure_ascii=False) for tool in tools]
    return "\n".join([TOOLS_PREAMBLE, *lines])


def fit_template(record: dict, features: dict) -> tuple[dict, set[str]]:
    """The record rewritten so that the template shows all of it (see the module docstring), and what
    was moved: a subset of {"tools", "tool_calls", "tool_results"}."""
    if "messages" not in record:
        return record, set()
    moved, messages = set(), [dict(m) for m in record["messages"]]
    for message in messages:
        if message.get("tool_calls") and not features["tool_calls"]:
            message["content"] = tokens.answer_text(message)
            del message["tool_calls"]
            moved.add("tool_calls")
        if message["role"] == "tool" and not features["tool_results"]:
            message.update(role="user", content=TOOL_RESULT_PREFIX + message["content"])
            message.pop("tool_call_id", None)
            message.pop("name", None)
            moved.add("tool_results")
    out = {k: v for k, v in record.items() if k != "messages"}
    if record.get("tools") and not features["tools"]:
        block = tools_text(out.pop("tools"))
        if messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{block}" if messages[0]["content"] else block
        else:
            messages.insert(0, {"role": "system", "content": block})
        moved.add("tools")
    return {"messages": messages, **out}, moved


def tool_schemas(records: list[dict]) -> dict[str, dict]:
    """{tool name: parameters schema} over the records' tool definitions, the first definition of a name kept."""
    schemas: dict[str, dict] = {}
    for record in records:
        for tool in record.get("tools") or []:
            schemas.setdefault(tool["function"]["name"], tool["function"]["parameters"])
    return schemas
