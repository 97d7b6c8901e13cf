"""End to end: `make all` on the real default model and config, as a user types it (~8 minutes). It runs
alone (serial), with every core, because it asserts the README's figures: train and eval times among them."""

from __future__ import annotations

import json

from pipeline import contracts
from pipeline.hashing import sha256_file, sha256_tree

import pytest

from helpers import free_port, make, request, server, wait_ready
from lm import docker as docker_export


@pytest.mark.slow
@pytest.mark.serial  # timed
def test_make_all_on_the_default_model_then_nothing_to_do(project):
    first = make(project, "all")
    assert "base model ready" in first.stderr
    manifest = contracts.read_json(project / "runs" / "model.manifest.json", "run_manifest")
    assert manifest["environment"]["blas"] in ("openblas", "accelerate")
    assert manifest["details"]["rope_theta"] == 100000.0
    assert manifest["details"]["parameters"] > 100_000_000
    model_dir = project / manifest["outputs"][0]["path"]
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"
    catalog = contracts.read_json(project / "data" / "data_catalog.json", "data_catalog")
    assert catalog["splits"]["test"]["records"] == 40
    report = contracts.read_json(project / "data" / "data_report.json", "data_report")
    assert report["splits"]["train"]["tokens"]["total"] == catalog["splits"]["train"]["tokens"] > 0
    assert (project / "data" / "data_report.md").read_text().startswith("# Data report")
    train_manifest = contracts.read_json(project / "runs" / "main" / "train.manifest.json", "run_manifest")
    details = train_manifest["details"]
    # The budget is 5 minutes on a quiet machine (README: 230-250 s for the 144 default steps). This shared
    # machine runs identical work up to ~30% slower at times (43 against 53-61 trained tok/s on 2026-12-07):
    # a bound at the budget itself fails on noise, so this one catches a real slowdown, not the weather.
    assert train_manifest["wall_seconds"] < 360, train_manifest["wall_seconds"]
    assert details["best_val_loss"] < 0.5 * details["first_val_loss"], details
    assert (project / "runs" / "main" / "loss.png").is_file()
    fuse_manifest = contracts.read_json(project / "runs" / "main" / "fuse.manifest.json", "run_manifest")
    assert fuse_manifest["details"]["max_logit_difference"] < 1e-3
    artifacts = contracts.read_json(project / "runs" / "main" / "artifacts.json", "artifacts")["artifacts"]
    assert [a["kind"] for a in artifacts] == [
        "base",
        "adapter",
        "fused",
        "mlx-quantized",
        "gguf",
        "gguf",
        "peft",
        "gguf-base",
        "gguf-base",
        "gguf-adapter",
    ]
    for artifact in artifacts:
        path = project / artifact["path"]
        assert artifact["sha256"] == (sha256_tree(path) if path.is_dir() else sha256_file(path)), artifact["id"]

    quantize = contracts.read_json(project / "runs" / "main" / "quantize.manifest.json", "run_manifest")["details"]
    assert quantize["export_check"]["matching"] == quantize["export_check"]["prompts"] > 0, quantize["export_check"]
    assert quantize["perplexity"]["by_type"]["Q4_K_M"]["ratio_vs_float"] < 1.2
    adapter_check = quantize["adapter"]["gguf"]["check"]  # base GGUF + adapter GGUF vs the fused float GGUF
    assert adapter_check["matching"] == adapter_check["prompts"] > 0, adapter_check
    assert adapter_check["max_logit_difference"] < adapter_check["tolerance"], adapter_check  # README: 0.03
    assert fuse_manifest["wall_seconds"] + quantize["seconds"]["gguf-f16"] + quantize["seconds"]["gguf-Q4_K_M"] < 60

    eval_manifest = contracts.read_json(project / "eval_out" / "main" / "eval.manifest.json", "run_manifest")
    assert eval_manifest["wall_seconds"] < 120, eval_manifest["wall_seconds"]  # README: 62-64 s measured
    metrics = contracts.read_json(project / "eval_out" / "main" / "metrics.json", "eval_metrics")
    by_kind = {a["kind"]: a for a in metrics["artifacts"]}
    assert all(a["status"] == "ok" for a in metrics["artifacts"]), metrics["artifacts"]
    task = metrics["task_metric"]
    assert task == "call_f1" and "tool calls" in metrics["task_metric_reason"]
    fused = by_kind["fused"]["metrics"]
    # README, measured here: call F1 89.2 and schema-valid 100 (base 0 and 0); a margin for other CPUs' sums
    assert fused[task]["value"] >= 84 and fused["schema_valid"]["value"] >= 92.5, fused
    assert fused[task]["value"] - by_kind["base"]["metrics"][task]["value"] >= 60, (task, by_kind)
    # the adapter route (base GGUF + adapter GGUF in llama.cpp) answers as the fused model: at most one record apart
    with_adapter = next(a for a in metrics["artifacts"] if a["kind"] == "gguf-adapter")["per_record"][task]
    assert sum(a != b for a, b in zip(with_adapter, by_kind["fused"]["per_record"][task])) <= 1
    verdict = metrics["verdict"]
    assert verdict["answer"] == "Yes" and verdict["records"] == 40 and verdict["low"] > 0, verdict
    policy = contracts.read_json(project / "eval_out" / "main" / "generation_policy.json", "generation_policy")
    assert policy["ship"] is not None
    package = contracts.read_json(project / "runs" / "main" / "package.manifest.json", "run_manifest")["details"]
    shipped = policy["ship"]["path"].rsplit("/", 1)[-1]
    assert (
        package["gguf"]["id"] == policy["ship"]["id"]
        and f"FROM ../quantized/{shipped}\n" in (project / "runs" / "main" / "package" / "Modelfile").read_text()
    )
    assert '"name"' in package["answer"]["answer"], package["answer"]
    route = (project / "runs" / "main" / "package" / "Modelfile.adapter").read_text()
    assert "FROM ../quantized/base-" in route and "ADAPTER ../quantized/main-lora.gguf\n" in route
    image = project / "runs" / "main" / "package" / shipped.replace(".gguf", ".docker.tar")
    assert docker_export.validate_oci_layout(image) == []
    report = (project / "eval_out" / "main" / "report.md").read_text()
    assert "Did fine-tuning help? Yes." in report and (project / "eval_out" / "main" / "task_metric.png").is_file()
    second = make(project, "all")
    assert "Nothing to be done for 'all'" in second.stdout
    served_tool_call(project)


def served_tool_call(project) -> None:
    """make serve: the shipped model, asked a test prompt over the OpenAI API, makes the expected tool call."""
    record = json.loads((project / "data" / "test.jsonl").read_text().splitlines()[0])
    messages = [m for m in record["messages"] if m["role"] != "assistant"]
    expected = json.loads(record["messages"][-1]["content"])
    port = free_port()
    with server(project, f"PORT={port}") as process:
        wait_ready(port, process)
        # llama-cpp-python's server applies a repeat penalty of 1.1 unless told otherwise; eval applies none
        body = {"messages": messages, "temperature": 0, "max_tokens": 64, "repeat_penalty": 1.0}
        answer = json.loads(request("POST", port, "/v1/chat/completions", body))["choices"][0]["message"]["content"]
    assert json.loads(answer) == expected, answer
    assert "server stopped" in process.output and "Traceback" not in process.output, process.output
