"""eval.verdict: the deciding metric follows the data, and every answer carries a paired interval."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from eval import verdict

CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})


@pytest.mark.parametrize(
    "fmt, references, lengths, schemas, expected",
    [
        ("text", ["x"] * 10, [5] * 10, None, "loss"),
        ("messages", [CALL] * 6 + ["Sunny."] * 4, [20] * 10, {"get_weather": {}}, "call_f1"),
        ("messages", [CALL] * 3 + ["Sunny."] * 7, [8] * 10, {"get_weather": {}}, "normalized_match"),
        ("completions", ['{"label": "spam"}'] * 10, [80] * 10, None, "normalized_match"),
        ("messages", ["SELECT name FROM t WHERE id = 3"] * 10, [12] * 10, None, "normalized_match"),
        ("messages", ["A long paragraph."] * 10, [150] * 10, None, "loss"),
        ("messages", ["Short mostly."] * 10, [10] * 8 + [300] * 2, None, "loss"),
    ],
    ids=["text", "tool-calls", "few-calls-short", "json", "short-sql", "long-free-form", "cut-by-max-tokens"],
)
def test_the_deciding_metric_follows_the_data(fmt, references, lengths, schemas, expected):
    metric, why = verdict.choose_task_metric(fmt, references, lengths, schemas, max_tokens=48)
    assert metric == expected and why


def scored(values) -> dict:
    return {"per_record": {"call_f1": list(values)}}


def test_no_measurable_change_cannot_tell():
    same = scored([100, 0, 50, 0, 100] * 8)
    diff = verdict.paired_difference("call_f1", same, same)
    assert diff == {"difference": 0.0, "low": 0.0, "high": 0.0, "records": 40}
    assert verdict.answer(diff) == "Can't tell"


def test_noise_around_zero_cannot_tell():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, 40) * 100.0
    flips = base.copy()
    flips[:4] = 100 - flips[:4]  # four answers change, two each way or so
    diff = verdict.paired_difference("call_f1", scored(flips), scored(base))
    assert diff["low"] <= 0 <= diff["high"]
    assert verdict.answer(diff) == "Can't tell"


def test_a_clear_improvement_is_yes_with_an_interval_above_zero():
    base, tuned = scored([0] * 40), scored([100] * 30 + [0] * 10)
    diff = verdict.paired_difference("call_f1", tuned, base)
    assert diff["difference"] == 75.0 and 0 < diff["low"] <= 75 <= diff["high"]
    assert verdict.answer(diff) == "Yes"
    assert verdict.answer(verdict.paired_difference("call_f1", base, tuned)) == "No"


def test_loss_is_lower_is_better_and_weighted_by_tokens():
    base = {"per_record": {"loss": [[2.0 * n, n] for n in range(1, 41)]}}  # loss 2.0 per token
    tuned = {"per_record": {"loss": [[1.0 * n, n] for n in range(1, 41)]}}  # 1.0 per token
    diff = verdict.paired_difference("loss", tuned, base)
    assert diff["difference"] == pytest.approx(1.0) and diff["low"] > 0
    assert diff["perplexity_ratio"] == pytest.approx(np.exp(-1.0), abs=1e-4)
    assert verdict.answer(diff) == "Yes"


def test_the_ship_rule_reads_the_interval():
    reference = scored([100] * 40)
    one_worse = scored([100] * 39 + [0])  # 2.5 points worse: its interval reaches -7.5
    far = scored([100] * 20 + [0] * 20)  # 50 points worse
    assert not verdict.qualifies("call_f1", verdict.paired_difference("call_f1", one_worse, reference), 2.0, 5.0)
    assert verdict.qualifies("call_f1", verdict.paired_difference("call_f1", one_worse, reference), 8.0, 5.0)
    assert not verdict.qualifies("call_f1", verdict.paired_difference("call_f1", far, reference), 2.0, 5.0)
    assert verdict.qualifies("call_f1", verdict.paired_difference("call_f1", reference, reference), 2.0, 5.0)
    base = {"per_record": {"loss": [[1.0 * n, n] for n in range(1, 41)]}}
    worse = {"per_record": {"loss": [[1.5 * n, n] for n in range(1, 41)]}}
    assert not verdict.qualifies("loss", verdict.paired_difference("loss", worse, base), 2.0, 5.0)
    assert verdict.qualifies("loss", verdict.paired_difference("loss", base, base), 2.0, 5.0)


def test_a_loss_only_twin_ships_on_its_loss():
    loss = [[1.0 * n, n] for n in range(1, 41)]
    fused = {"id": "fused", "kind": "fused", "format": "mlx", "path": "f", "bytes": 500, "status": "ok", "loss": 1.0}
    fused |= {
        "metrics": {"call_f1": {"value": 80.0, "status": "ok"}},
        "per_record": {"call_f1": [80.0] * 40, "loss": loss},
    }
    twin = {"id": "f16", "kind": "gguf", "format": "gguf-f16", "path": "g", "bytes": 250, "status": "ok", "loss": 1.0}
    twin |= {"metrics": {}, "per_record": {"loss": loss}}
    rule = SimpleNamespace(reference="fused", kinds=["fused", "gguf"], within_points=2.0, within_percent=5.0)
    decision = verdict.ship_decision([fused, twin], "call_f1", rule)
    assert decision["ship"]["id"] == "f16" and decision["ship"]["judged_by"] == "loss"
    assert decision["ship"]["task_metric"] is None and "loss only" in decision["reason"]
    worse = twin | {"id": "bad", "per_record": {"loss": [[1.2 * n, n] for n in range(1, 41)]}}
    assert verdict.ship_decision([fused, worse], "call_f1", rule)["ship"]["id"] == "fused"
