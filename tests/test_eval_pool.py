"""eval's scoring pool (scripts/eval/pool.py): how many artifacts are scored at once, that scoring them
side by side in child processes gives the very scores of one after the other, and that a child that
crashes fails its artifact alone."""

from __future__ import annotations

import os
import signal

from pipeline import contracts, paths, runtime
from pipeline.errors import PipelineError

import pytest

import eval as eval_stage
from eval import pool
from test_eval import EVAL, out_dir, quantized_project  # noqa: F401  (a fixture)

MODEL = {"kind": "fused", "bytes": 500_000_000}
QUANTIZED = {"kind": "mlx-quantized", "bytes": 150_000_000}


@pytest.mark.parametrize(
    "setting, threads, memory, artifacts, expected",
    [
        ("auto", 2, 24e9, [MODEL, QUANTIZED, MODEL], (2, 1)),
        ("auto", 4, 24e9, [MODEL, MODEL], (2, 2)),
        ("auto", 1, 24e9, [MODEL, MODEL], (1, 1)),  # PIPELINE_THREADS=1: the cores are someone else's too
        ("auto", 2, 1.5e9, [MODEL, MODEL], (1, 2)),  # two models do not fit in half the memory
        ("auto", 2, 24e9, [MODEL], (1, 1)),  # one left to score: the threads it would have had beside another
        (3, 6, 24e9, [MODEL] * 5, (3, 2)),
        (4, 2, 24e9, [MODEL] * 2, (2, 1)),  # never more workers than artifacts
    ],
)
def test_workers_and_threads_follow_the_setting_cores_and_memory(
    monkeypatch, setting, threads, memory, artifacts, expected
):
    monkeypatch.setattr(runtime, "cpu_threads", lambda: threads)
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: int(memory))
    monkeypatch.setattr(runtime, "device_name", lambda: "cpu")
    assert pool.plan(setting, artifacts) == expected


def test_the_longest_jobs_go_first_a_gguf_that_answers_then_mlx_that_answers_then_loss_only():
    jobs = [(MODEL, False), (QUANTIZED, True), ({"kind": "gguf"}, False), ({"kind": "gguf"}, True), (MODEL, True)]
    ranked = sorted(range(len(jobs)), key=lambda n: pool.length_rank(*jobs[n]))
    assert ranked == [3, 1, 4, 0, 2]


def test_auto_is_one_worker_on_a_gpu(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_threads", lambda: 8)
    monkeypatch.setattr(runtime, "device_name", lambda: "gpu")
    assert pool.plan("auto", [MODEL, MODEL]) == (1, 8)


def echo_threads_or_crash(artifact: dict) -> dict:
    """A scoring job for the tests: dies of SIGSEGV for an artifact named crash, else tells its environment."""
    if artifact["id"] == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    return {"id": artifact["id"], "root": str(paths.ROOT), "threads": os.environ["OPENBLAS_NUM_THREADS"]}


def test_a_crashing_child_fails_its_job_alone(project):
    jobs = [({"id": "a", "path": "a"},), ({"id": "crash", "path": "runs/x.gguf"},), ({"id": "b", "path": "b"},)]
    outcomes = dict(pool.run(jobs, echo_threads_or_crash, workers=2, threads=1))
    assert sorted(outcomes) == [0, 1, 2]
    assert outcomes[0] == {"id": "a", "root": str(project), "threads": "1"} and outcomes[2]["id"] == "b"
    crash = outcomes[1]
    assert isinstance(crash, PipelineError) and "scoring crash crashed (SIGSEGV)" in str(crash)
    failed = eval_stage.scored_result({**jobs[1][0], "kind": "gguf", "format": "gguf", "bytes": 1}, crash)
    assert failed["status"] == "failed" and "SIGSEGV" in failed["error"]


def test_scoring_side_by_side_gives_the_scores_of_one_after_the_other(quantized_project, caplog):  # noqa: F811
    runs = {}
    for workers in (1, 2):
        caplog.clear()
        assert eval_stage.main([*EVAL, f"eval.workers={workers}"]) == 0
        assert ("scoring 7 artifacts, 2 at once" in caplog.text) == (workers == 2)
        metrics = contracts.read_json(out_dir() / "metrics.json", "eval_metrics")
        assert all(a["status"] == "ok" and not a["cached"] for a in metrics["artifacts"]), metrics["artifacts"]
        runs[workers] = {
            "artifacts": {a["id"]: a for a in metrics["artifacts"]},
            "generations": (out_dir() / "final_generations.jsonl").read_bytes(),
        }
        for cache in (paths.STATE_DIR / "eval").rglob("*.json"):
            cache.unlink()  # scored anew by the next run
    one, two = runs[1]["artifacts"], runs[2]["artifacts"]
    assert list(one) == list(two) and len(one) == 7 and runs[1]["generations"] == runs[2]["generations"]
    for aid, alone in one.items():
        side_by_side = two[aid]
        assert side_by_side["metrics"] == alone["metrics"], aid  # the same answers, so the same task metrics
        losses = zip(alone["per_record"].pop("loss"), side_by_side["per_record"].pop("loss"))
        assert side_by_side["per_record"] == alone["per_record"], aid
        # one BLAS thread a worker instead of two sums some products in another order: the last digits move
        assert all(n == m and abs(a - b) <= 1e-6 * abs(a) for (a, n), (b, m) in losses), aid
