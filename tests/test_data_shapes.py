"""Your own data, end to end: each common public dataset shape (tests/fixtures/public_shapes.py) runs
prepare → train → fuse → eval on the tiny model, and the verdict uses the metric its data calls for."""

from __future__ import annotations

from pipeline import contracts, paths

import pytest

import eval as eval_stage
import fuse
import prepare
import train
from fixtures import public_shapes
from helpers import FAST_TRAIN

EVAL = ["eval.artifacts=[base,adapter,fused]"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return public_shapes.write_all(tmp_path_factory.mktemp("shapes"))


def run_pipeline(source, *train_args: str, eval_args=()) -> dict:
    assert prepare.main([f"data.source={source}"]) == 0
    assert train.main([*FAST_TRAIN, *train_args]) == 0
    assert fuse.main([]) == 0
    assert eval_stage.main([*EVAL, *eval_args]) == 0
    return contracts.read_json(paths.eval_dir("main") / "metrics.json", "eval_metrics")


@pytest.mark.parametrize(
    "shape, metric, reason",
    [
        ("text_splits", "loss", "plain text"),
        ("alpaca_array", "loss", "long free-form"),
        ("glaive_sharegpt", "normalized_match", "short"),
        ("openai_tools", "call_f1", "tool calls"),
    ],
)
def test_every_shape_trains_and_gets_the_verdict_its_data_calls_for(base, shapes, shape, metric, reason):
    metrics = run_pipeline(shapes[shape])
    assert all(a["status"] == "ok" for a in metrics["artifacts"]), metrics["artifacts"]
    assert metrics["task_metric"] == metric and reason in metrics["task_metric_reason"]
    verdict = metrics["verdict"]
    assert verdict["metric"] == metric and verdict["records"] > 0
    assert verdict["low"] <= verdict["difference"] <= verdict["high"]
    assert verdict["answer"] in ("Yes", "No", "Can't tell")
    report = (paths.eval_dir("main") / "report.md").read_text()
    assert f"**Did fine-tuning help? {verdict['answer']}" in report and "95% interval" in report


def test_a_clear_improvement_is_yes_with_an_interval_above_zero(base, shapes):
    metrics = run_pipeline(shapes["text_splits"], "train.iters=16", "train.learning_rate=1e-2")
    verdict = metrics["verdict"]
    assert verdict["metric"] == "loss" and verdict["answer"] == "Yes"
    assert 0 < verdict["low"] <= verdict["difference"] and verdict["perplexity_ratio_high"] < 1
    assert "**Did fine-tuning help? Yes.**" in (paths.eval_dir("main") / "report.md").read_text()


def test_fine_tuning_that_changes_nothing_measurable_cannot_tell(base, shapes):
    metrics = run_pipeline(shapes["openai_tools"], "train.learning_rate=1e-12")
    verdict = metrics["verdict"]
    assert verdict["metric"] == "call_f1" and verdict["answer"] == "Can't tell"
    assert verdict["low"] <= 0 <= verdict["high"]
    assert "Can't tell" in (paths.eval_dir("main") / "report.md").read_text()
