"""eval's verdict: which metric decides for this data, how sure the answer is, and what may ship.

The deciding metric (eval.task_metric: auto) follows the data:
- `text` records (no prompt/answer split): test loss (perplexity is its exp);
- tool-call answers (the data declares tool schemas and at least half the test answers are calls):
  call_f1;
- short structured answers (JSON in at least half the test answers, or a median answer of at most
  SHORT_ANSWER_TOKENS tokens with 90% of answers within eval.max_tokens): normalized_match;
- anything else (long free-form answers, where a match on a capped answer says little): test loss,
  with chrF shown beside it.

Every comparison of two artifacts is paired over the same test records: a bootstrap (resampling
records, fixed seed) gives a 95% interval for the difference, signed so that above zero is better.
"Did fine-tuning help?" is Yes when the interval is above zero, No when it is below, Can't tell when
it holds zero. The ship rule reads the same intervals: an artifact qualifies when its interval shows
it is at most the tolerance worse than the reference (eval.ship.within_points for point metrics,
eval.ship.within_percent of perplexity for loss), so a few lucky answers never ship a worse model.
An artifact scored on loss only (a check proved it equal to the fused model) is judged by its loss.
"""

from __future__ import annotations

import math

import numpy as np

from eval import metrics

LOWER_IS_BETTER = ("loss",)
SHORT_ANSWER_TOKENS = 32
CONFIDENCE = 0.95
RESAMPLES = 2000


def choose_task_metric(fmt: str, references: list[str], reference_tokens: list[int], tool_schemas, max_tokens: int):
    """(metric, why) for eval.task_metric=auto, from the data (see the module docstring)."""
    if fmt == "text":
        return "loss", "the records are plain text: there is no answer to match, so test loss decides"
    if not references:
        return "loss", "no test answers to match"
    calls = sum(metrics.as_call(r) is not None for r in references) / len(references)
    if tool_schemas and calls >= 0.5:
        return "call_f1", f"the data declares tools and {calls:.0%} of the test answers are tool calls"
    json_share = sum(metrics.parse_json(r) is not None for r in references) / len(references)
    median, p90 = float(np.median(reference_tokens)), float(np.percentile(reference_tokens, 90))
    if json_share >= 0.5:
        return "normalized_match", f"{json_share:.0%} of the test answers are JSON"
    if median <= SHORT_ANSWER_TOKENS and p90 <= max_tokens:
        return "normalized_match", (
            f"the test answers are short (median {median:.0f} tokens, 90% within {p90:.0f} <= eval.max_tokens)"
        )
    if median <= SHORT_ANSWER_TOKENS:
        return "loss", (
            f"more than 10% of the test answers are longer than eval.max_tokens={max_tokens} (90% within "
            f"{p90:.0f} tokens): a match on cut answers says little, so test loss decides (raise eval.max_tokens "
            "to decide by normalized_match)"
        )
    return "loss", (
        f"the test answers are long free-form text (median {median:.0f} tokens, 90% within {p90:.0f}): a match on "
        "answers capped at eval.max_tokens says little, so test loss decides and chrF is shown"
    )


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def paired_difference(metric: str, candidate: dict, reference: dict, seed: int = 0) -> dict | None:
    """The candidate minus the reference on `metric` over their common records, signed so that above
    zero is better, with a bootstrap interval: {"difference", "low", "high", "records"}; for loss also
    the perplexity ratio and its interval. None when either lacks per-record values. Records are in
    test order and a proven twin is scored on the first of them, so the common records are a prefix."""
    a, b = _per_record(candidate, metric), _per_record(reference, metric)
    if a is None or b is None or min(len(a), len(b)) == 0:
        return None
    a, b = a[: len(b)], b[: len(a)]
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(a), size=(RESAMPLES, len(a)))
    if lower_is_better(metric):
        return _loss_difference(a, b, samples)
    diffs = a - b
    resampled = diffs[samples].mean(axis=1)
    low, high = _interval(resampled)
    return {"difference": round(float(diffs.mean()), 4), "low": low, "high": high, "records": len(a)}


def _per_record(artifact: dict, metric: str):
    values = (artifact.get("per_record") or {}).get(metric)
    return None if values is None else np.asarray(values, dtype=np.float64)


def _loss_difference(a: np.ndarray, b: np.ndarray, samples: np.ndarray) -> dict:
    """a, b: per-record [summed nll, tokens]; the token-weighted loss of the reference minus the candidate's."""

    def loss(pairs, index=None):
        nll, tokens = (pairs[..., 0], pairs[..., 1]) if index is None else (pairs[index, 0], pairs[index, 1])
        return nll.sum(axis=-1) / np.maximum(tokens.sum(axis=-1), 1)

    point = float(loss(b) - loss(a))
    resampled = loss(b, samples) - loss(a, samples)
    low, high = _interval(resampled)
    ratio = [round(math.exp(-x), 4) for x in (point, high, low)]  # perplexity of the candidate / the reference
    return {
        "difference": round(point, 6),
        "low": low,
        "high": high,
        "records": len(a),
        "perplexity_ratio": ratio[0],
        "perplexity_ratio_low": ratio[1],
        "perplexity_ratio_high": ratio[2],
    }


def _interval(values: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return round(float(low), 6), round(float(high), 6)


def answer(difference: dict | None) -> str:
    """Yes (the interval is above zero), No (below: it got worse), Can't tell (it holds zero)."""
    if difference is None:
        return "Not measured"
    if difference["low"] > 0:
        return "Yes"
    if difference["high"] < 0:
        return "No"
    return "Can't tell"


def qualifies(metric: str, difference: dict | None, within_points: float, within_percent: float) -> bool:
    """A candidate may ship when its whole interval is within the tolerance of the reference (the
    reference itself always qualifies: its difference to itself is exactly zero)."""
    if difference is None:
        return False
    if lower_is_better(metric):
        return difference["perplexity_ratio_high"] <= 1 + within_percent / 100
    return difference["low"] >= -within_points


def _value(artifact: dict, metric: str):
    if metric == "loss":
        return artifact.get("loss")
    return (artifact.get("metrics") or {}).get(metric, {}).get("value")


def outcome(results: list[dict], metric: str) -> dict | None:
    """ "Did fine-tuning help?": the fine-tuned model (fused, else base + adapter) against the base, on
    the deciding metric, with the paired interval and the answer; None when either was not scored."""
    by_kind = {r["kind"]: r for r in results if r["status"] == "ok"}
    base, tuned = by_kind.get("base"), by_kind.get("fused") or by_kind.get("adapter")
    if base is None or tuned is None or _value(base, metric) is None or _value(tuned, metric) is None:
        return None
    difference = paired_difference(metric, tuned, base)
    if difference is None:
        return None
    return {
        "answer": answer(difference),
        "metric": metric,
        "base_id": base["id"],
        "tuned_id": tuned["id"],
        "tuned_kind": tuned["kind"],
        "base": _value(base, metric),
        "tuned": _value(tuned, metric),
        "base_loss": base["loss"],
        "tuned_loss": tuned["loss"],
        "confidence": CONFIDENCE,
        **difference,
    }


def ship_decision(results: list[dict], metric: str, ship) -> dict:
    """{"ship", "reason", "rule", "candidates", "comparisons"}: the smallest shippable artifact that
    qualifies against the reference (see qualifies), each comparison with its interval."""
    rule = {
        "metric": metric,
        "reference": ship.reference,
        "within_points": ship.within_points,
        "within_percent": ship.within_percent,
        "prefer": "smallest",
    }
    scored = [r for r in results if r["status"] == "ok"]
    reference = next((r for r in scored if r["kind"] == ship.reference and _value(r, metric) is not None), None)
    decision = {"ship": None, "reason": None, "rule": rule, "candidates": [], "comparisons": []}
    if reference is None:
        decision["reason"] = f"no {ship.reference} artifact scored on {metric} to compare with"
        return decision
    for r in (r for r in scored if r["kind"] in ship.kinds):
        judged_by = metric if _value(r, metric) is not None else "loss"  # loss only: a proven twin
        difference = paired_difference(judged_by, r, reference)
        ok = qualifies(judged_by, difference, ship.within_points, ship.within_percent)
        decision["comparisons"].append({"id": r["id"], "metric": judged_by, "qualifies": ok, **(difference or {})})
        if ok:
            decision["candidates"].append(r)
    if not decision["candidates"]:
        decision["reason"] = (
            f"no shippable artifact is shown (95% paired interval) to be within {_tolerance(metric, ship)} of "
            f"the {ship.reference} model"
        )
        return decision
    best = min(decision["candidates"], key=lambda r: (r["bytes"], r["id"]))
    judged_by = next(c["metric"] for c in decision["comparisons"] if c["id"] == best["id"])
    decision["ship"] = {k: best[k] for k in ("id", "kind", "format", "path", "bytes")} | {
        "task_metric": _value(best, metric),
        "judged_by": judged_by,
    }
    decision["candidates"] = [r["id"] for r in decision["candidates"]]
    decision["reason"] = (
        f"the smallest artifact shown (95% paired interval over the test records) to be within "
        f"{_tolerance(judged_by, ship)} of the {ship.reference} model"
        + ("" if judged_by == metric else " (scored on loss only: a check proved it equal to the fused model)")
    )
    return decision


def _tolerance(metric: str, ship) -> str:
    return (
        f"{ship.within_percent:g}% in perplexity"
        if lower_is_better(metric)
        else f"{ship.within_points:g} points of {metric}"
    )
