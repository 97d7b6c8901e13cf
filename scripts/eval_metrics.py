"""eval, part 1: task metrics on generated answers, each in points (0–100, higher is better).

Built in: exact_match, normalized_match (JSON compared as parsed values, text compared lowercased
with spacing and punctuation folded), chrf (sacrebleu's corpus chrF), json_valid and, when the data
declares tool schemas, schema_valid (a {"name", "arguments"} call whose arguments satisfy the
named tool's JSON Schema). Plugins named `module:function` in eval.plugins are called per example
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

BUILTIN = ("exact_match", "normalized_match", "chrf", "json_valid", "schema_valid")
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
    from jsonschema import Draft202012Validator

    return {name: Draft202012Validator(schema) for name, schema in (tool_schemas or {}).items()}


def call_is_valid(prediction: str, validators: dict) -> bool:
    call = parse_json(prediction)
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        return False
    validator = validators.get(call["name"]) if isinstance(call["name"], str) else None
    return validator is not None and isinstance(call["arguments"], dict) and validator.is_valid(call["arguments"])


def load_plugins(names) -> dict[str, Callable | Exception]:
    """Each `module:function` imported from the project root or scripts/; an import failure is kept as the error."""
    for folder in (paths.ROOT, paths.ROOT / "scripts"):
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
    plugins = {}
    for name in names:
        module_name, _, function_name = name.partition(":")
        if not module_name or not function_name:
            raise PipelineError(f"metric plugin '{name}' is not module:function", where="config eval.plugins", fix="name it like my_metrics:keyword_hit")
        try:
            plugins[name] = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as exc:
            plugins[name] = exc
    return plugins


def score(predictions: list[str], references: list[str], records: list[dict], tool_schemas: dict | None, plugins: dict) -> dict:
    """{metric: {"value": points, "status": "ok"} or {"value": None, "status": "failed", "error": ...}}."""
    import sacrebleu

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
