"""make bench's plumbing: figures (best and median of the runs, or why not run), ratios of medians only
between figures that were measured, a results file the schema accepts, and a table that shows them; and
one real measurement end to end (matmul with both BLAS libraries)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from pipeline import contracts, paths

import pytest

from test_eval import quantized_project  # noqa: F401  (a fixture)

spec = importlib.util.spec_from_file_location("bench_run", paths.ROOT / "bench" / "run.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
spec = importlib.util.spec_from_file_location("answer_speed", paths.ROOT / "bench" / "answer_speed.py")
answer_speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(answer_speed)


def test_a_figure_is_the_best_and_median_of_its_runs():
    faster = bench.figure("tok/s", "tokens/s", [30.0, 10.0, 20.0])
    assert (faster["best"], faster["median"]) == (30.0, 20.0)
    shorter = bench.figure("wall", "s", [3.0, 1.0, 2.0], higher_is_better=False)
    assert (shorter["best"], shorter["median"]) == (1.0, 2.0)
    skipped = bench.figure("torch", "tokens/s", [], why="not run: make bench-setup first")
    assert skipped["status"] == "not run" and skipped["reason"].startswith("not run")


def test_ratios_are_of_medians_and_only_of_what_was_measured():
    measurements = {
        "train_pipeline_trained": bench.figure("p", "tokens/s", [24.0, 26.0, 25.0]),
        "train_mlx_lm_trained": bench.figure("m", "tokens/s", [20.0, 19.0, 18.0]),
        "train_torch_trained": bench.figure("t", "tokens/s", [], why="not run"),
    }
    ratios = bench.ratios(measurements)
    assert [r["of"] + "/" + r["to"] for r in ratios] == ["train_pipeline_trained/train_mlx_lm_trained"]
    assert ratios[0]["median"] == pytest.approx(25.0 / 19.0, abs=1e-3)


def test_results_validate_and_the_table_shows_every_figure():
    measurements = {
        "matmul_fast_gflops": bench.figure("float32 matmul, openblas BLAS", "GFLOP/s", [250.0, 260.0]),
        "matmul_reference_gflops": bench.figure("float32 matmul, reference BLAS", "GFLOP/s", [5.0, 5.2]),
        "train_torch_trained": bench.figure("PyTorch + PEFT", "tokens/s", [], why="not run: make bench-setup"),
    }
    results = {
        "schema_version": 1,
        "measured_at": "2026-12-04T21:00:00+00:00",
        "machine": bench.machine(),
        "settings": {"repeats": 2, "steps": 8, "warmup": 2},
        "measurements": measurements,
        "ratios": bench.ratios(measurements),
    }
    assert contracts.violations(results, "bench_results") == []
    table = bench.results_markdown(results)
    assert "| float32 matmul, openblas BLAS | GFLOP/s | 260 | 255 | 250, 260 |" in table
    assert "| float32 matmul, reference BLAS | GFLOP/s | 5.2 | 5.1 | 5, 5.2 |" in table
    assert "| PyTorch + PEFT | tokens/s | – | – | not run: make bench-setup |" in table
    assert f"| loaded BLAS / MLX's bundled BLAS (GFLOP/s) | {255 / 5.1:.2f}× |" in table
    broken = {**results, "ratios": [{"name": "x", "of": "a", "to": "b", "median": 0}]}
    assert contracts.violations(broken, "bench_results")


@pytest.mark.slow
def test_bench_measures_matmul_with_both_blas_libraries(tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(paths.ROOT / "bench" / "run.py"),
            "--only",
            "matmul",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=paths.ROOT,
        check=True,
        env={"PYTHONPATH": "scripts", "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")},
    )
    results = contracts.read_json(tmp_path / "results.json", "bench_results")
    fast, reference = results["measurements"]["matmul_fast_gflops"], results["measurements"]["matmul_reference_gflops"]
    assert "openblas" in fast["what"] and "reference" in reference["what"]
    assert fast["median"] > 10 * reference["median"], (fast, reference)
    assert "loaded BLAS / MLX's bundled BLAS" in (tmp_path / "results.md").read_text()


def test_the_prepare_benchmark_file_is_the_same_every_time(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    bench.write_chat_records(first, 50)
    bench.write_chat_records(second, 50)
    lines = first.read_bytes().splitlines()
    assert first.read_bytes() == second.read_bytes() and len(lines) == 50
    record = json.loads(lines[7])
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"] and record["messages"][0]["content"][
        :2
    ] == "7 "


def test_answer_speeds_of_a_finished_run(quantized_project, capsys):  # noqa: F811
    assert answer_speed.main([str(quantized_project), "--one-at-a-time", "2", "--gguf-type", "Q8_0"]) == 0
    speeds = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(speeds) == {"mlx_one_at_a_time", "mlx_batched", "llama_cpp_batched"}
    assert all(value > 0 for value in speeds.values()), speeds
