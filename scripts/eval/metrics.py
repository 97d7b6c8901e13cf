"""eval's task metrics on generated answers, each in points (0–100, higher is better).

Built in: exact_match, normalized_match (JSON compared as parsed values, text compared lowercased
with spacing and punctuation folded), chrf (sacrebleu's corpus chrF), json_valid and, when the data
declares tool schemas, three tool-call metrics: schema_valid (a {"name", "arguments"} call whose
arguments satisfy the named tool's JSON Schema), tool_match (the reference's tool is called) and
call_f1 (the right tool with the right arguments: F1 over argument name/value pairs, strings compared
as normalized text, 0 for a wrong tool; partial credit for a call that misses or adds an argument).
Plugins named `module:function` in eval.plugins are called per example
as function(prediction, reference, record) -> bool | float in [0, 1]; one that raises is reported
as failed and the rest go on.
"""

from __future__ import annotations

import importlib
import json
import re
import string
import sys
from collections.abc import Callable

from pipeline import paths
from pipeline.errors import PipelineError

import sacrebleu
from jsonschema import Draft202012Validator

BUILTIN = ("exact_match", "normalized_match", "chrf", "json_valid", "schema_valid", "tool_match", "call_f1")
TOOL_METRICS = ("schema_valid", "tool_match", "call_f1")  # measured when the data declares tool schemas
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def parse_json(text: str):
    """The answer as a JSON value, or None: the whole answer must be one JSON document."""
    try:
        return json.loads(text.strip())
    except ValueError:
        return None


def normalize_text(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def normalized_equal(prediction: str, reference: str) -> bool:
    ref_value = parse_json(reference)
    if ref_value is not None:
        return parse_json(prediction) == ref_value
    return normalize_text(prediction) == normalize_text(reference)


def schema_validators(tool_schemas: dict | None) -> dict:
    return {name: Draft202012Validator(schema) for name, schema in (tool_schemas or {}).items()}


def call_is_valid(prediction: str, validators: dict) -> bool:
    call = parse_json(prediction)
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        return False
    validator = validators.get(call["name"]) if isinstance(call["name"], str) else None
    return validator is not None and isinstance(call["arguments"], dict) and validator.is_valid(call["arguments"])


def as_call(text: str) -> dict | None:
    """A {"name": str, "arguments": dict} tool call, or None."""
    call = parse_json(text)
    if isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments", {}), dict):
        return {"name": call["name"], "arguments": call.get("arguments", {})}
    return None


def tool_match(prediction: str, reference: str) -> bool:
    expected, got = as_call(reference), as_call(prediction)
    return expected is not None and got is not None and got["name"] == expected["name"]


def call_f1(prediction: str, reference: str) -> float:
    """F1 over the arguments of a call to the right tool (0 for another tool or no call).
    A reference that is not a tool call is scored by normalized match."""
    expected, got = as_call(reference), as_call(prediction)
    if expected is None:
        return float(normalized_equal(prediction, reference))
    if got is None or got["name"] != expected["name"]:
        return 0.0
    want, have = expected["arguments"], got["arguments"]
    if not want and not have:
        return 1.0
    hits = sum(1 for key, value in have.items() if key in want and _same_value(value, want[key]))
    return 2.0 * hits / (len(want) + len(have))


def _same_value(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return normalize_text(a) == normalize_text(b)
    return a == b and isinstance(a, bool) == isinstance(b, bool)  # true is not 1


def load_plugins(names) -> dict[str, Callable | Exception]:
    """Each `module:function` imported from the project root or scripts/; an import failure is kept as the error."""
    for folder in (paths.ROOT, paths.ROOT / "scripts"):
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
    plugins = {}
    for name in names:
        module_name, _, function_name = name.partition(":")
        if not module_name or not function_name:
            raise PipelineError(
                f"metric plugin '{name}' is not module:function",
                where="config eval.plugins",
                fix="name it like my_metrics:keyword_hit",
            )
        try:
            plugins[name] = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as exc:
            plugins[name] = exc
    return plugins


def score(
    predictions: list[str], references: list[str], records: list[dict], tool_schemas: dict | None, plugins: dict
) -> dict:
    """{metric: {"value": points, "status": "ok"} or {"value": None, "status": "failed", "error": ...}}."""
    n = len(predictions)

    def mean(flags) -> float:
        return 100.0 * sum(float(f) for f in flags) / n if n else 0.0

    results = {
        "exact_match": mean(p.strip() == r.strip() for p, r in zip(predictions, references)),
        "normalized_match": mean(normalized_equal(p, r) for p, r in zip(predictions, references)),
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score if n else 0.0,
        "json_valid": mean(parse_json(p) is not None for p in predictions),
    }
    if tool_schemas:
        validators = schema_validators(tool_schemas)
        results["schema_valid"] = mean(call_is_valid(p, validators) for p in predictions)
        results["tool_match"] = mean(tool_match(p, r) for p, r in zip(predictions, references))
        results["call_f1"] = mean(call_f1(p, r) for p, r in zip(predictions, references))
    table = {name: {"value": round(value, 4), "status": "ok"} for name, value in results.items()}
    for name, plugin in plugins.items():
        table[name] = run_plugin(plugin, predictions, references, records)
    return table


def run_plugin(plugin, predictions, references, records) -> dict:
    if isinstance(plugin, Exception):
        return {"value": None, "status": "failed", "error": f"cannot import: {plugin}"}
    try:
        values = [float(plugin(p, r, rec)) for p, r, rec in zip(predictions, references, records)]
    except Exception as exc:  # a user's metric must not take the others down
        return {"value": None, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    if any(not 0.0 <= v <= 1.0 for v in values):
        return {"value": None, "status": "failed", "error": "returned a value outside [0, 1]"}
    return {"value": round(100.0 * sum(values) / len(values), 4) if values else 0.0, "status": "ok"}
