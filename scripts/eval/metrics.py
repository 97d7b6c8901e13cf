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
import importlib.util
import json
import logging
import re
import string
import sys
from collections.abc import Callable

from pipeline import paths
from pipeline.errors import PipelineError

import sacrebleu
from jsonschema import Draft202012Validator

log = logging.getLogger("eval")

BUILTIN = ("exact_match", "normalized_match", "chrf", "json_valid", "schema_valid", "tool_match", "call_f1")
TOOL_METRICS = ("schema_valid", "tool_match", "call_f1")  # measured when the data declares tool schemas
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_CALL_WRAPPER = re.compile(r"\s*(?:<tool_call>|```(?:json)?)\s*(.*?)\s*(?:</tool_call>|```)\s*$", re.S)


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
    """A {"name": str, "arguments": dict} tool call, or None. The JSON may be wrapped the way tool-aware
    chat templates write calls (<tool_call>…</tool_call>, a ```json fence) or be an OpenAI call object."""
    call = parse_json(text)
    if call is None and (wrapped := _CALL_WRAPPER.match(text)):
        call = parse_json(wrapped.group(1))
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]
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


def load_plugins(names) -> dict[str, Callable]:
    """Each `module:function` imported from the project root or scripts/; one that cannot be is an error."""
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
        plugins[name] = _import_plugin(name, module_name, function_name)
    return plugins


def _import_plugin(name: str, module_name: str, function_name: str) -> Callable:
    """The plugin's function, or one line saying why it cannot be used (checked before anything is scored)."""
    fix = "fix the module, or remove it from eval.plugins"
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as exc:
        raise PipelineError(
            f"metric plugin '{name}' has a syntax error: {exc.msg}",
            where=f"{paths.display(exc.filename or module_name)}:{exc.lineno}",
            fix=fix,
        ) from None
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise _plugin_error(name, module_name, exc, fix) from None
        raise PipelineError(
            f"no module {module_name} for metric plugin '{name}'",
            where="config eval.plugins",
            fix=f"put {module_name}.py in the project root (or scripts/), or correct the name",
        ) from None
    except Exception as exc:  # the module's own code failed while importing
        raise _plugin_error(name, module_name, exc, fix) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        found = "is not a function" if function is not None else "is not defined"
        raise PipelineError(
            f"{function_name} {found} in the module of metric plugin '{name}'",
            where=paths.display(getattr(module, "__file__", None) or module_name),
            fix=f"define def {function_name}(prediction, reference, record) -> float in it",
        )
    return function


def _plugin_error(name: str, module_name: str, exc: Exception, fix: str) -> PipelineError:
    module = sys.modules.get(module_name)
    where = getattr(module, "__file__", None) or _module_file(module_name)
    reason = str(exc).splitlines()[0] if str(exc) else ""
    return PipelineError(
        f"importing metric plugin '{name}' failed: {type(exc).__name__}: {reason}",
        where=paths.display(where),
        fix=fix,
    )


def _module_file(module_name: str) -> str:
    spec = importlib.util.find_spec(module_name)
    return spec.origin if spec and spec.origin else module_name


def score(
    predictions: list[str], references: list[str], records: list[dict], tool_schemas: dict | None, plugins: dict
) -> dict:
    """{metric: {"value": points, "status": "ok"} or {"value": None, "status": "failed", "error": ...}}."""
    return score_records(predictions, references, records, tool_schemas, plugins)[0]


def score_records(predictions, references, records, tool_schemas, plugins) -> tuple[dict, dict[str, list[float]]]:
    """score()'s table, and each metric's per-record values in points (chrF, a corpus statistic, has none):
    what eval's paired intervals resample."""
    pairs = list(zip(predictions, references))
    per_record = {
        "exact_match": [p.strip() == r.strip() for p, r in pairs],
        "normalized_match": [normalized_equal(p, r) for p, r in pairs],
        "json_valid": [parse_json(p) is not None for p in predictions],
    }
    if tool_schemas:
        validators = schema_validators(tool_schemas)
        per_record["schema_valid"] = [call_is_valid(p, validators) for p in predictions]
        per_record["tool_match"] = [tool_match(p, r) for p, r in pairs]
        per_record["call_f1"] = [call_f1(p, r) for p, r in pairs]
    per_record = {name: [100.0 * float(v) for v in values] for name, values in per_record.items()}
    results = {name: sum(values) / len(values) if values else 0.0 for name, values in per_record.items()}
    results["chrf"] = sacrebleu.corpus_chrf(predictions, [references]).score if pairs else 0.0
    order = ("exact_match", "normalized_match", "chrf", "json_valid", *TOOL_METRICS)
    table = {name: {"value": round(results[name], 4), "status": "ok"} for name in order if name in results}
    for name, plugin in plugins.items():
        table[name], values = run_plugin(plugin, predictions, references, records)
        if values is not None:
            per_record[name] = values
        if table[name]["status"] == "failed":
            log.warning("metric plugin %s failed: %s", name, table[name]["error"])
    return table, per_record


def run_plugin(plugin, predictions, references, records) -> tuple[dict, list[float] | None]:
    """(table entry, per-record points or None when it failed)."""
    try:
        values = [float(plugin(p, r, rec)) for p, r, rec in zip(predictions, references, records)]
    except Exception as exc:  # a user's metric must not take the others down
        return {"value": None, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}, None
    if any(not 0.0 <= v <= 1.0 for v in values):
        return {"value": None, "status": "failed", "error": "returned a value outside [0, 1]"}, None
    points = [100.0 * v for v in values]
    return {"value": round(sum(points) / len(points), 4) if points else 0.0, "status": "ok"}, points
