"""eval stage on the tiny model: every artifact scored, report with charts, contracts valid, the fast
loss equal to the plain one, and bad input (empty test split, failing plugin, broken artifact); an
artifact that cannot be scored fails the stage, and the next run scores only it (the score cache)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from pipeline import config, contracts, paths, splits
from pipeline.manifest import file_entry

import mlx.core as mx
import numpy as np
import orjson
import pytest
from mlx_lm import load
from mlx_lm.generate import batch_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import dequantize_model
from omegaconf import OmegaConf

import eval as eval_stage
import fuse
import prepare
import quantize
from eval import metrics as eval_metrics
from eval import scores
from fixtures import datasets as fx
from helpers import error_line, make, trained
from lm.llama_runner import shared_prefix_length
from train.data import validation_loss

QUANTIZE = [
    "quantize.mlx=[affine-4]",
    "quantize.gguf_types=[Q8_0]",
    "quantize.check_prompts=1",
    "quantize.check_max_tokens=8",
    "quantize.perplexity_records=2",
]
EVAL = ["eval.records=6", "eval.max_tokens=12"]


@pytest.fixture
def quantized_project(project, tiny_model_dir):
    trained(tiny_model_dir)
    assert fuse.main([]) == 0
    assert quantize.main(QUANTIZE) == 0
    return project


def out_dir() -> Path:
    return paths.EVAL_DIR / "main"


def test_eval_scores_every_artifact_and_writes_the_report(quantized_project):
    assert eval_stage.main(EVAL) == 0
    metrics = contracts.read_json(out_dir() / "metrics.json", "eval_metrics")
    policy = contracts.read_json(out_dir() / "generation_policy.json", "generation_policy")
    kinds = [a["kind"] for a in metrics["artifacts"]]
    assert kinds == ["base", "adapter", "fused", "mlx-quantized", "gguf", "gguf", "gguf-adapter"]
    assert all(a["status"] == "ok" for a in metrics["artifacts"]), metrics["artifacts"]
    by_kind = {a["kind"]: a for a in metrics["artifacts"]}
    # base + adapter and fused are the same function; the float GGUF runs it in llama.cpp
    assert abs(by_kind["adapter"]["loss"] - by_kind["fused"]["loss"]) < 1e-3
    assert abs(by_kind["gguf"]["loss"] - by_kind["fused"]["loss"]) < 0.05
    assert by_kind["base"]["delta_vs_base"]["normalized_match"] == 0
    assert set(by_kind["fused"]["metrics"]) == {
        "exact_match",
        "normalized_match",
        "chrf",
        "json_valid",
        "schema_valid",
        "tool_match",
        "call_f1",
    }
    assert metrics["task_metric"] == "call_f1"

    rows = [orjson.loads(line) for line in (out_dir() / "final_generations.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["test_records"] == 6
    answered = {a["id"] for a in metrics["artifacts"] if a["generation"]}
    assert set(rows[0]["outputs"]) == answered and rows[0]["reference"]
    # proven equal to the fused model by fuse's and quantize's checks: scored on loss only
    loss_only = {a["id"]: a["loss_only_reason"] for a in metrics["artifacts"] if not a["generation"]}
    assert set(loss_only) == {"main/adapter", "main/main-f16.gguf"} and all(loss_only.values())
    assert all(len(a["per_record"]["loss"]) == 6 for a in metrics["artifacts"])
    assert all(len(a["per_record"]["call_f1"]) == 6 for a in metrics["artifacts"] if a["generation"])
    v = metrics["verdict"]
    assert v["answer"] in ("Yes", "No", "Can't tell") and v["low"] <= v["difference"] <= v["high"]
    assert v["records"] == 6 and v["tuned_id"] == "main/fused" and v["metric"] == "call_f1"
    for chart in ("task_metric.png", "size_vs_quality.png", "loss_curve.png"):
        assert (out_dir() / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out_dir() / "report.md").read_text()
    assert report.index("Did fine-tuning help?") < report.index("| artifact |") and "![" in report
    assert policy["generation"]["stop_tokens"] == ["<|im_end|>"] and policy["generation"]["max_tokens"] == 12
    manifest = contracts.read_json(out_dir() / "eval.manifest.json", "run_manifest")
    assert {o["role"] for o in manifest["outputs"]} >= {"metrics", "generation_policy", "report", "final_generations"}


def test_adapter_gguf_on_the_base_gguf_answers_like_the_fused_float_gguf(quantized_project):
    artifacts = "eval.artifacts=[fused,gguf,gguf-adapter]"
    assert eval_stage.main([*EVAL, artifacts, "eval.proven=answers"]) == 0
    metrics = contracts.read_json(out_dir() / "metrics.json", "eval_metrics")
    by_id = {a["id"]: a for a in metrics["artifacts"]}
    float_gguf, with_adapter = by_id["main/main-f16.gguf"], by_id["main/main-lora.gguf"]
    assert with_adapter["status"] == "ok" and with_adapter["engine"] == "llama.cpp"
    assert with_adapter["loss"] == pytest.approx(float_gguf["loss"], abs=1e-3)
    assert with_adapter["metrics"]["call_f1"] == float_gguf["metrics"]["call_f1"]
    rows = [orjson.loads(line) for line in (out_dir() / "final_generations.jsonl").read_text().splitlines()]
    assert all(row["outputs"]["main/main-lora.gguf"] == row["outputs"]["main/main-f16.gguf"] for row in rows)
    assert "| main/main-lora.gguf |" in (out_dir() / "report.md").read_text()


def test_adapter_gguf_answers_every_answered_record_and_its_loss_covers_the_proven_records(quantized_project):
    assert eval_stage.main([*EVAL, "eval.artifacts=[base,fused,gguf-adapter]", "eval.proven_records=3"]) == 0
    metrics = contracts.read_json(out_dir() / "metrics.json", "eval_metrics")
    with_adapter = next(a for a in metrics["artifacts"] if a["kind"] == "gguf-adapter")
    assert len(with_adapter["per_record"]["loss"]) == 3 and len(with_adapter["per_record"]["call_f1"]) == 6
    assert "Loss over the first 3 test records for `main/main-lora.gguf`" in (out_dir() / "report.md").read_text()


def test_fewer_answered_records_than_loss_records(quantized_project):
    assert eval_stage.main([*EVAL, "eval.answer_records=2", "eval.artifacts=[base,fused]"]) == 0
    metrics = contracts.read_json(out_dir() / "metrics.json", "eval_metrics")
    assert metrics["answered_records"] == 2 and metrics["test_records"] == 6
    assert all(len(a["per_record"]["loss"]) == 6 for a in metrics["artifacts"])
    assert all(len(a["per_record"]["call_f1"]) == 2 for a in metrics["artifacts"])
    rows = [orjson.loads(line) for line in (out_dir() / "final_generations.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1] and set(rows[1]["outputs"]) == {"base", "main/fused"}
    assert "2 of 6 test records" in (out_dir() / "report.md").read_text()


def test_proven_twins_are_scored_on_the_first_proven_records_only(quantized_project):
    def artifacts(*kinds) -> dict:
        assert eval_stage.main([*EVAL, "eval.proven_records=2", f"eval.artifacts=[{','.join(kinds)}]"]) == 0
        return {a["id"]: a for a in contracts.read_json(out_dir() / "metrics.json", "eval_metrics")["artifacts"]}

    alone = artifacts("base", "adapter")  # no fused model to be the twin of: scored like the rest
    assert len(alone["main/adapter"]["per_record"]["loss"]) == 6
    scored = artifacts("base", "adapter", "fused", "gguf")
    twins = [i for i, a in scored.items() if a.get("loss_only_reason")]
    assert twins == ["main/adapter", "main/main-f16.gguf"]
    for twin in (scored[i] for i in twins):
        pairs = scored["base"]["per_record"]["loss"][:2]
        base_loss = sum(nll for nll, _ in pairs) / sum(n for _, n in pairs)
        assert len(twin["per_record"]["loss"]) == 2 and twin["generation"] is None
        assert twin["delta_vs_base"]["loss"] == pytest.approx(twin["loss"] - base_loss, abs=2e-4)
    assert all(len(scored[i]["per_record"]["loss"]) == 6 for i in scored if i not in twins)
    policy = contracts.read_json(out_dir() / "generation_policy.json", "generation_policy")
    f16 = next(c for c in policy["comparisons"] if c["id"] == "main/main-f16.gguf")
    assert f16["metric"] == "loss" and f16["records"] == 2
    report = (out_dir() / "report.md").read_text()
    assert re.search(r"\| main/main-f16\.gguf \| [^|]+ \| [\d.]+ \(2 rec\.\) \|", report)
    assert "over the first 2 test records" in report


def test_fast_loss_equals_the_plain_masked_loss(quantized_project):

    model, tokenizer = load(str(paths.RUNS_DIR / "main" / "fused"))
    contract = contracts.read_json(paths.DATA_DIR / "data_contract.json", "data_contract")
    items = list(eval_stage.loss_items_for(splits.read_split(contract, "test", 6), contract, tokenizer).values())
    assert shared_prefix_length(items) > 5  # the shared-prefix path is really taken
    expected = validation_loss(model, items, 1, -1, 4096)
    assert eval_stage.mlx_loss(model, items, 4) == pytest.approx(expected, rel=1e-4)


def test_quantized_model_dequantized_for_cpu_gives_the_same_logits(quantized_project):

    folder = paths.RUNS_DIR / "main" / "quantized" / "mlx-affine-4bit-g64"
    quantized, _ = load(str(folder))
    tokens = mx.array([list(range(3, 40))])
    expected = np.array(quantized(tokens))
    np.testing.assert_allclose(np.array(dequantize_model(quantized)(tokens)), expected, atol=1e-3)


def test_empty_test_split_is_recorded_as_skipped(quantized_project):
    qa = fx.write_jsonl(paths.ROOT / "qa.jsonl", [{"prompt": q, "completion": a} for q, a in fx.qa_pairs()])
    splits = ["data.splits.train=0.9", "data.splits.valid=0.1", "data.splits.test=0"]
    assert prepare.main([f"data.source=[{qa}]", *splits]) == 0
    assert (paths.DATA_DIR / "test.jsonl").read_text() == ""
    assert eval_stage.main(EVAL) == 0
    metrics = contracts.read_json(out_dir() / "metrics.json", "eval_metrics")
    assert metrics["status"] == "skipped" and "no records" in metrics["reason"] and metrics["artifacts"] == []
    assert contracts.read_json(out_dir() / "generation_policy.json", "generation_policy")["ship"] is None
    assert "Skipped" in (out_dir() / "report.md").read_text()


def test_broken_artifact_and_failing_plugin_do_not_stop_the_rest(quantized_project, monkeypatch, caplog):
    # An artifact that fails to load although its files are what quantize made (a changed file is refused
    # before anything is scored: test_bad_input). The others are scored and reported, then the stage fails.
    real_load = eval_stage.load

    def load(path, **kwargs):
        if "mlx-affine-4bit" in str(path):
            raise RuntimeError("cannot load this one")
        return real_load(path, **kwargs)

    monkeypatch.setattr(eval_stage, "load", load)
    plugin = paths.ROOT / "my_metrics.py"
    plugin.write_text(
        "def boom(prediction, reference, record):\n    raise RuntimeError('plugin bug')\n\n"
        "def nonempty(prediction, reference, record):\n    return bool(prediction)\n"
    )
    # eval.workers=1: scored in this process, where the monkeypatch is
    assert eval_stage.main([*EVAL, "eval.workers=1", "eval.plugins=[my_metrics:boom, my_metrics:nonempty]"]) == 2
    line = error_line(caplog)
    assert "main/mlx-affine-4bit-g64 (RuntimeError: cannot load this one)" in line and "1 of 7 artifacts" in line
    assert not (out_dir() / "eval.manifest.json").exists()
    metrics = contracts.read_json(out_dir() / "metrics.json", "eval_metrics")
    by_kind = {a["kind"]: a for a in metrics["artifacts"]}
    assert by_kind["mlx-quantized"]["status"] == "failed"
    assert by_kind["mlx-quantized"]["error"] == "RuntimeError: cannot load this one"
    assert [a["status"] for a in metrics["artifacts"]].count("ok") == 6
    fused = by_kind["fused"]["metrics"]
    assert fused["my_metrics:boom"] == {"value": None, "status": "failed", "error": "RuntimeError: plugin bug"}
    assert fused["my_metrics:nonempty"]["status"] == "ok" and fused["normalized_match"]["status"] == "ok"
    report = (out_dir() / "report.md").read_text()
    assert "could not be scored" in report and "my_metrics:boom" in report


def test_unknown_task_metric_is_one_clear_error(quantized_project, caplog):
    assert eval_stage.main([*EVAL, "eval.task_metric=bleu"]) == 2
    assert (
        "'eval.task_metric' must be one of" in caplog.text
        and "normalized_match" in caplog.text
        and not out_dir().exists()
    )


def test_missing_artifacts_is_one_clear_error(project, caplog):
    assert eval_stage.main([]) == 2
    assert "no artifacts to score" in caplog.text


def _result(artifact_id, kind, size, correct: list[int]):
    """An artifact scored on 40 test records, `correct` the indices of its right answers."""
    per_record = [100.0 if i in correct else 0.0 for i in range(40)]
    return {
        "id": artifact_id,
        "kind": kind,
        "format": kind,
        "path": artifact_id,
        "bytes": size,
        "status": "ok",
        "loss": 1.0,
        "metrics": {"normalized_match": {"value": sum(per_record) / 40, "status": "ok"}},
        "per_record": {"normalized_match": per_record},
    }


FUSED_RIGHT = list(range(32))  # 80 points


@pytest.mark.parametrize(
    "q4_right, expected",
    [
        (FUSED_RIGHT, "q4"),  # the same answers: the whole interval is 0, ships the smallest
        (FUSED_RIGHT[:31], "q8"),  # one answer fewer: -2.5 points, not shown within 2 points
        (FUSED_RIGHT[:20], "q8"),  # 30 points worse
        (FUSED_RIGHT, None),  # no fused model to compare with
    ],
)
def test_ship_rule_reads_the_paired_interval(q4_right, expected):
    cfg = config.load_config([])
    results = [
        _result("base", "base", 500, []),
        _result("fused", "fused", 500, FUSED_RIGHT),
        _result("q8", "gguf", 150, FUSED_RIGHT),
        _result("q4", "gguf", 90, q4_right),
    ]
    if expected is None:
        results[1]["status"] = "failed"
    contract = {"template": {"id": "model", "sha256": "0" * 64}}

    class Tok:
        eos_token_ids = [2]

        def convert_ids_to_tokens(self, i):
            return "<|im_end|>"

    policy = eval_stage.generation_policy("main", results, contract, Tok(), cfg.eval, "normalized_match", None)
    contracts.validate({"schema_version": 1, **policy}, "generation_policy", where="test")
    if expected is None:
        assert policy["ship"] is None and "no fused artifact scored" in policy["reason"]
        return
    assert policy["ship"]["id"] == expected
    q4 = next(c for c in policy["comparisons"] if c["id"] == "q4")
    assert q4["qualifies"] == (expected == "q4") and q4["low"] <= q4["difference"] <= q4["high"]


def test_metrics_compare_json_by_value_and_check_schemas():
    assert eval_metrics.normalized_equal('{"b": 1, "a": [1, 2]}', '{"a":[1,2],"b":1}')
    assert not eval_metrics.normalized_equal('{"a": 1}', '{"a": 2}')
    assert eval_metrics.normalized_equal("Hello,  World!", "hello world")
    validators = eval_metrics.schema_validators(
        {
            "get_weather": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            }
        }
    )
    assert eval_metrics.call_is_valid('{"name": "get_weather", "arguments": {"city": "Oslo"}}', validators)
    assert not eval_metrics.call_is_valid('{"name": "get_weather", "arguments": {"town": "Oslo"}}', validators)
    assert not eval_metrics.call_is_valid('{"name": "nope", "arguments": {}}', validators)
    assert "tool_match" not in eval_metrics.score(["{}"], ["{}"], [{}], None, {})  # no tool schemas, no tool metrics
    scores = eval_metrics.score(["abc", "{}"], ["abc", "[]"], [{}, {}], None, {})
    assert scores["exact_match"]["value"] == 50.0 and scores["json_valid"]["value"] == 50.0  # "abc" is not JSON
    assert 0 < scores["chrf"]["value"] <= 100


def test_call_f1_credits_the_right_tool_and_each_right_argument():
    reference = '{"name": "create_event", "arguments": {"title": "Book club", "date": "2026-04-08", "time": "18:00"}}'
    f1 = eval_metrics.call_f1
    assert f1(reference, reference) == 1.0
    assert (
        f1(
            '{"arguments": {"date": "2026-04-08", "time": "18:00", "title": "book club"}, "name": "create_event"}',
            reference,
        )
        == 1.0
    )
    assert f1(
        '{"name": "create_event", "arguments": {"title": "Book club", "date": "2026-04-08"}}', reference
    ) == pytest.approx(0.8)  # 2 of 3 found, none wrong
    assert f1(
        '{"name": "create_event", "arguments": {"title": "Book club", "date": "2026-04-09", "time": "18:00"}}',
        reference,
    ) == pytest.approx(2 / 3)
    assert (
        f1(
            '{"name": "set_timer", "arguments": {"title": "Book club", "date": "2026-04-08", "time": "18:00"}}',
            reference,
        )
        == 0.0
    )
    assert f1("create_event(title='Book club')", reference) == 0.0
    assert (
        f1(
            '{"name": "set_timer", "arguments": {"minutes": true}}',
            '{"name": "set_timer", "arguments": {"minutes": 1}}',
        )
        == 0.0
    )
    assert (
        f1('{"name": "set_timer", "arguments": {"minutes": 5.0}}', '{"name": "set_timer", "arguments": {"minutes": 5}}')
        == 1.0
    )
    assert eval_metrics.tool_match('{"name": "create_event", "arguments": {}}', reference)
    assert not eval_metrics.tool_match('{"name": "set_timer", "arguments": {}}', reference)
    assert f1("Hello, world", "hello world") == 1.0  # a reference that is not a call: normalized match


def test_generation_from_the_loss_pass_prompt_caches_gives_the_same_answers(quantized_project):

    model, tokenizer = load(str(paths.RUNS_DIR / "main" / "fused"))
    contract = contracts.read_json(paths.DATA_DIR / "data_contract.json", "data_contract")
    records = splits.read_split(contract, "test", 8)
    prompts, _ = eval_stage.prompts_and_references(records, contract, tokenizer)
    items = eval_stage.loss_items_for(records, contract, tokenizer)
    ecfg = OmegaConf.create(
        {
            "seed": 0,
            "temperature": 0.0,
            "top_p": 1.0,
            "max_tokens": 10,
            "batch_size": 3,
            "loss_batch_size": 2,
            "fast_exp": True,
        }
    )
    keep = {k: len(prompts[j]) for k, j in enumerate(items)}
    _, caches = eval_stage.mlx_nll(model, list(items.values()), 2, keep)
    assert sorted(caches.rows) == sorted(keep) and caches.prefix_length > 5  # the system prompt, held once
    for k, j in enumerate(items):  # each kept row is its own prompt's: with the prefix, it gives the prompt's logits
        cache = make_prompt_cache(model)
        for layer, (prefix_kv, own_kv) in zip(cache, zip(caches.prefix, caches.rows[k])):
            keys, values = (mx.concatenate([p, o], axis=2) for p, o in zip(prefix_kv, own_kv))
            layer.state = (keys, values, keys.shape[2])
        assert cache[0].offset == len(prompts[j]) - 1
        from_cache = model(mx.array([prompts[j][-1:]]), cache=cache)[0, -1]
        np.testing.assert_allclose(np.array(from_cache), np.array(model(mx.array([prompts[j]]))[0, -1]), atol=1e-4)
    fresh = batch_generate(model, tokenizer, prompts, max_tokens=10, return_token_ids=True).token_ids  # mlx-lm's own
    artifact = next(
        a
        for a in contracts.read_json(paths.RUNS_DIR / "main" / "artifacts.json", "artifacts")["artifacts"]
        if a["kind"] == "fused"
    )
    scored = eval_stage.score_mlx(artifact, [artifact], prompts, items, tokenizer, ecfg, [10] * len(prompts))
    stop = set(tokenizer.eos_token_ids)
    assert scored["answers"] == [tokenizer.decode([t for t in ids if t not in stop]).strip() for ids in fresh]
    assert scored["loss"] == pytest.approx(eval_stage.mlx_loss(model, list(items.values()), 4), rel=1e-4)


# --- a failed artifact is a failed stage; the score cache -------------------------------------------


def _artifacts() -> list[dict]:
    return contracts.read_json(paths.artifacts_file("main"), "artifacts")["artifacts"]


def _gguf() -> dict:
    return next(a for a in _artifacts() if a["kind"] == "gguf")


def _damage_gguf_as_if_quantize_wrote_it(gguf: dict) -> dict[Path, bytes]:
    """A GGUF that llama.cpp refuses to load (its magic overwritten), recorded in artifacts.json and
    quantize's manifest as quantize's own output, as a quantize that wrote a bad file would leave it:
    eval's upstream checks pass and the failure is llama.cpp's. Returns the files' original bytes."""
    path = paths.resolve(gguf["path"])
    manifest_path = paths.run_dir("main") / "quantize.manifest.json"
    originals = {p: p.read_bytes() for p in (path, paths.artifacts_file("main"), manifest_path)}
    path.write_bytes(b"XXXX" + originals[path][4:])
    artifacts = contracts.read_json(paths.artifacts_file("main"), "artifacts")
    for artifact in artifacts["artifacts"]:
        if artifact["id"] == gguf["id"]:
            artifact.update({k: file_entry("gguf", path)[k] for k in ("sha256", "bytes")})
    contracts.write_json(paths.artifacts_file("main"), artifacts, "artifacts")
    manifest = contracts.read_json(manifest_path, "run_manifest")
    for entry in manifest["outputs"]:
        entry.update({k: file_entry(entry["role"], paths.resolve(entry["path"]))[k] for k in ("sha256", "bytes")})
    contracts.write_json(manifest_path, manifest, "run_manifest")
    return originals


def _scored_lines(console: str) -> dict[str, str]:
    """{artifact id: the rest of its progress line} from eval's log."""
    return dict(re.findall(r"\[eval\] \[\d+/\d+\] (\S+): (.*)", console))


@pytest.fixture
def made_copy(finished, finished_copy) -> Path:
    """finished_copy as Make left it: with the config slices (in .state/, which finished_copy leaves out, so
    that Make would run every stage again), `make -q all` says it is up to date."""
    shutil.copytree(finished / ".state" / "config", finished_copy / ".state" / "config")
    assert make(finished_copy, "-q", "all", check=False).returncode == 0
    return finished_copy


def test_a_failed_artifact_fails_eval_and_the_next_run_scores_only_it(made_copy):
    root, gguf = made_copy, _gguf()
    manifest = root / "eval_out" / "main" / "eval.manifest.json"
    originals = _damage_gguf_as_if_quantize_wrote_it(gguf)

    failed = make(root, "eval", check=False)
    console = failed.stdout + failed.stderr
    assert failed.returncode != 0, console
    assert "Traceback" not in console, console  # a model that cannot be loaded is not a bug in eval
    errors = [line for line in console.splitlines() if "[eval] error:" in line]
    assert len(errors) == 1, console
    assert f"{gguf['id']} (ValueError: Failed to load model from file: {gguf['path']})" in errors[0]
    assert "1 of 5 artifacts could not be scored" in errors[0] and " -- fix: " in errors[0]
    # not done: no manifest, so Make runs eval again; what it found is there for people to read
    assert not manifest.exists() and make(root, "-q", "eval", check=False).returncode != 0
    metrics = contracts.read_json(root / "eval_out/main/metrics.json", "eval_metrics")
    assert {a["id"]: a["status"] for a in metrics["artifacts"]} == {
        a["id"]: "failed" if a["id"] == gguf["id"] else "ok"
        for a in _artifacts()
        if a["kind"] in eval_stage.SCORED_KINDS
    }
    assert f"`{gguf['id']}` could not be scored" in (root / "eval_out/main/report.md").read_text()
    error_log = (root / "eval_out/main/logs/eval-error.log").read_text()
    assert gguf["id"] in error_log and "Traceback" in error_log and "llama_cpp" in error_log
    cached = {a["id"]: scores.cache_path("main", a["id"]) for a in metrics["artifacts"]}
    assert [aid for aid, path in cached.items() if not path.is_file()] == [gguf["id"]]
    mtimes = {aid: path.stat().st_mtime_ns for aid, path in cached.items() if aid != gguf["id"]}

    for path, data in originals.items():  # quantize's own file and records again
        path.write_bytes(data)
    fixed = make(root, "eval")
    lines = _scored_lines(fixed.stdout + fixed.stderr)
    assert set(lines) == set(cached), fixed.stderr
    assert [aid for aid, line in lines.items() if "(cached" not in line] == [gguf["id"]], fixed.stderr
    assert {aid: cached[aid].stat().st_mtime_ns for aid in mtimes} == mtimes and cached[gguf["id"]].is_file()
    metrics = contracts.read_json(root / "eval_out/main/metrics.json", "eval_metrics")
    assert all(a["status"] == "ok" for a in metrics["artifacts"])
    assert {a["id"]: a["cached"] for a in metrics["artifacts"]} == {aid: aid != gguf["id"] for aid in cached}
    assert manifest.is_file() and not (root / "eval_out/main/logs/eval-error.log").exists()
    assert make(root, "-q", "eval", check=False).returncode == 0


def test_cached_scores_are_reused_until_what_they_depend_on_changes(finished_copy):
    def run(*overrides) -> dict[str, dict]:
        assert eval_stage.main(list(overrides)) == 0
        return {a["id"]: a for a in contracts.read_json(out_dir() / "metrics.json", "eval_metrics")["artifacts"]}

    first = run()
    assert not any(a["cached"] for a in first.values())
    scores.cache_path("main", "base").write_text("{not json")  # a damaged cache entry is only a miss
    for shared in (paths.STATE_DIR / "eval" / "_shared").glob("*.json"):  # the base's, kept for all experiments
        shared.write_text("{not json")
    second = run("eval.examples=1", "eval.ship.within_points=5")  # settings that act after scoring
    assert {aid: a["cached"] for aid, a in second.items()} == {aid: aid != "base" for aid in first}
    same = ("loss", "perplexity", "metrics", "delta_vs_base")  # deterministic: re-scored base included
    assert [{k: a[k] for k in same} for a in second.values()] == [{k: a[k] for k in same} for a in first.values()]
    third = run("eval.max_tokens=5")  # a setting the scores depend on
    assert not any(a["cached"] for a in third.values())
    assert all(a["generation"]["tokens"] <= 5 * 4 for a in third.values() if a["generation"])


def test_a_bug_in_eval_is_raised_not_recorded_as_a_failed_artifact(finished_copy, monkeypatch, caplog):
    def buggy(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(eval_stage, "score_mlx", buggy)
    before = {p: p.read_bytes() for p in sorted((finished_copy / "eval_out").rglob("*")) if p.is_file()}
    with pytest.raises(TypeError, match="unsupported operand"):
        eval_stage.run(config.load_config(["eval.workers=1"]))  # in this process, where the monkeypatch is
    assert eval_stage.main(["eval.workers=1"]) == 1  # the CLI's bug report: one line, the traceback in a file
    assert "this is a bug in the eval stage" in error_line(caplog)
    assert "TypeError" in (out_dir() / "logs" / "eval-error.log").read_text()
    after = {p: p.read_bytes() for p in sorted((finished_copy / "eval_out").rglob("*")) if p.is_file()}
    assert {p: d for p, d in after.items() if p.parent.name != "logs"} == before  # nothing recorded
    assert not scores.cache_path("main", "base").exists()


@pytest.mark.parametrize(
    "setting, metric, expected",
    [("auto", "call_f1", 100), ("auto", "loss", 20), (-1, "loss", 150), (30, "call_f1", 30), ("auto", "chrf", 100)],
)
def test_answered_records_follow_what_decides(setting, metric, expected):
    assert eval_stage.answered_count(150, setting, metric) == expected
