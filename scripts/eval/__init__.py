"""eval stage: score every artifact of an experiment on the held-out test split, and pick the one to ship.

Reads config section `eval`, runs/<experiment>/artifacts.json (artifacts), data/data_contract.json
(data_contract), the test split, runs/<experiment>/metrics.jsonl and runs/experiments.csv. For the
base model, base + adapter, the fused model, each MLX quantized model and each GGUF (in llama.cpp):
test loss and perplexity on the same tokens, greedy answers to every test prompt (batched, capped at
eval.max_tokens new tokens) and task metrics on them. Writes eval_out/<experiment>/ —
final_generations.jsonl, metrics.json (eval_metrics), generation_policy.json (generation_policy),
report.md with charts — then eval_out/summary.md across experiments and, last,
eval_out/<experiment>/eval.manifest.json (run_manifest).

An artifact that cannot be scored (it fails to load or run: SCORING_FAILURES) does not stop the others,
but it fails the stage: the report and metrics show it, its traceback is in
eval_out/<experiment>/logs/eval-error.log, no manifest is written (so Make runs eval again) and the
error line names it. Scores are cached per artifact (eval.scores), so the next run scores only the
artifacts that failed or changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import math
import os
import platform
import time
import traceback
from pathlib import Path

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import cli, config, contracts, paths, repro_script, run_record, runtime, splits, stages
from pipeline.errors import PipelineError
from pipeline.log import ItemProgress
from pipeline.manifest import StageRun, file_entry

import mlx.core as mx
import numpy as np
import orjson
from mlx_lm import load
from mlx_lm.generate import batch_generate
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer
from mlx_lm.utils import dequantize_model
from omegaconf import OmegaConf

from eval import metrics as eval_metrics
from eval import pool, scores, verdict
from eval import report as eval_report
from lm import cpu_activations, fast_exp, llama_runner, served, shared_prefix, tokens
from lm.llama_runner import shared_prefix_length

log = logging.getLogger("eval")

SCORED_KINDS = ("base", "adapter", "fused", "mlx-quantized", "gguf", "gguf-adapter")
# How a model fails to load or run (a damaged file, a llama.cpp error, out of memory): recorded against
# the artifact, and the stage fails after scoring the rest. Any other exception is a bug in eval: it
# propagates with its traceback.
SCORING_FAILURES = (RuntimeError, ValueError, OSError, MemoryError, PipelineError)


def build_parser():
    return cli.stage_parser("eval", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("eval", args, run)


def run(cfg) -> Path:
    ecfg = cfg.eval
    experiment = cfg.experiment.name
    run_dir, out_dir = paths.run_dir(experiment), paths.eval_dir(experiment)
    stage = StageRun("eval", {"eval": config.section(cfg, "eval")}, experiment=experiment)
    artifacts = read_artifacts(experiment)
    stages.read_manifest("prepare")
    for upstream in sorted({a["stage"] for a in artifacts} & set(stages.STAGES)):
        stages.read_manifest(upstream, experiment)  # every artifact is still what its stage made
    contract = contracts.read_json(paths.DATA_CONTRACT, "data_contract")
    plugins = eval_metrics.load_plugins(ecfg.plugins)
    records = splits.read_split(contract, "test", ecfg.records)
    selected = [a for a in artifacts if a["kind"] in ecfg.artifacts and a["kind"] in SCORED_KINDS]

    tokenizer = load_tokenizer(artifacts)
    tracebacks: dict[str, str] = {}  # of the artifacts that could not be scored
    tool_schemas = read_tool_schemas(contract)
    prompts, references = prompts_and_references(records, contract, tokenizer)
    task_metric, task_reason = resolve_task_metric(ecfg.task_metric, contract, plugins, references, tokenizer, ecfg)
    answered = answered_count(len(records), ecfg.answer_records, task_metric)
    caps = answer_caps(references[:answered], tokenizer, ecfg.max_tokens)
    results, answers, skipped = [], {}, None
    if not records:
        skipped = f"the test split ({contract['splits']['test']}) has no records"
        log.warning("eval skipped: %s", skipped)
    else:
        loss_items = loss_items_for(records, contract, tokenizer)
        common_key = scores.common_key(config.section(cfg, "eval"), contract)
        plans = scoring_plans(ecfg, artifacts, selected, experiment, task_metric, len(records))
        test = TestSet(prompts, references, records, loss_items, caps, task_metric, tool_schemas, plugins)
        results = score_selected(cfg, artifacts, selected, test, plans, common_key, tracebacks)
        answers = {r["id"]: r.pop("answers") for r in results if r.get("answers") is not None}
        add_deltas(results, task_metric)

    outcome = verdict.outcome(results, task_metric)
    metrics = metrics_document(experiment, contract, records, results, (task_metric, task_reason), skipped)
    metrics.update(answered_records=len(caps) if records else 0, verdict=outcome)
    policy = generation_policy(experiment, results, contract, tokenizer, ecfg, task_metric, skipped)
    staged_dir = stage.staged(out_dir)
    with contracts.atomic_dir(staged_dir) as tmp:
        if records:
            write_generations(tmp / "final_generations.jsonl", prompts, references, answers, tokenizer)
        contracts.write_json(tmp / "metrics.json", metrics, "eval_metrics")
        contracts.write_json(tmp / "generation_policy.json", policy, "generation_policy")
        eval_report.write_report(tmp, experiment, metrics, policy, run_dir, contract)
        if tracebacks:
            write_error_log(tmp / "logs" / "eval-error.log", tracebacks)
    manifest_path = stages.get("eval").manifest_path(experiment)
    if tracebacks:
        # The report shows the failure, so it replaces the last one; the manifest that vouched for the
        # last one goes with it and no new one is written: the stage is not done, and Make runs it again.
        stage.staging.commit(manifest_path, lambda path: None)
        raise failed_artifacts_error(results, experiment, out_dir)
    inputs = [
        file_entry("artifacts", paths.artifacts_file(experiment)),
        file_entry("data_contract", paths.DATA_CONTRACT),
    ]
    platform_name = f"{platform.system()}-{platform.machine()}"
    repro_script.write(staged_dir / "repro.sh", experiment, run_record.lock_entry(), platform_name)
    outputs = [stage.entry(p.stem, out_dir / p.name) for p in sorted(staged_dir.iterdir()) if p.is_file()]
    this_stage = {"started_at": stage.started_at, "wall_seconds": stage.elapsed(), "inputs": inputs, "outputs": outputs}
    record_path = run_record.path(experiment)
    run_record.write(stage.staged(record_path), run_record.gather(cfg, this_stage))
    outputs.append(stage.entry("run_manifest", record_path))
    stage.finish(
        manifest_path,
        inputs,
        outputs,
        {"task_metric": task_metric, "verdict": outcome, "ship": policy["ship"], "skipped": skipped},
    )
    log.info("report: %s", paths.display(out_dir / "report.md"))
    return out_dir


@dataclasses.dataclass
class TestSet:
    """What every artifact is scored on, and how its answers are judged."""

    prompts: list[list[int]]
    references: list[str]
    records: list[dict]
    loss_items: dict[int, tuple]  # {record index: (token ids, loss mask)}
    caps: list[int]  # each answered prompt's cap on new tokens (the first len(caps) records are answered)
    task_metric: str
    tool_schemas: dict | None
    plugins: dict


def score_selected(cfg, artifacts, selected, test: TestSet, plans: dict, common_key: dict, tracebacks) -> list[dict]:
    """Every selected artifact's result, in order, with its task metrics: from the score cache, or scored
    now (eval.pool: several at once where the machine allows). The tracebacks of the artifacts that could
    not be scored go into `tracebacks`."""
    experiment, eval_section = cfg.experiment.name, config.section(cfg, "eval")
    results: list[dict | None] = [None] * len(selected)
    jobs, keys = {}, {}  # by position in `selected`
    with ItemProgress(len(selected), "eval", log) as progress:
        for index, artifact in enumerate(selected):
            plan = plans.get(artifact["id"], Plan())
            keys[index] = scores.artifact_key(artifact, artifacts, common_key) | {
                "proven_twin": None if plan.answers else plan.loss_records,
                "loss_records": plan.loss_records,
            }
            cached = cached_result(experiment, artifact, keys[index])
            if cached is None:
                items = test.loss_items
                if plan.loss_records is not None:
                    items = {j: item for j, item in items.items() if j < plan.loss_records}
                caps = test.caps if plan.answers else []
                jobs[index] = (artifact, artifacts, test.prompts, items, eval_section, caps)
                continue
            results[index] = finish_result(cached, plan, test)
            progress.advance(summary_line(results[index], test.task_metric))
        order = sorted(jobs, key=lambda index: pool.length_rank(jobs[index][0], answers=bool(jobs[index][5])))
        workers, threads = pool.plan(cfg.eval.workers, [jobs[index][0] for index in order])
        if workers > 1:
            log.info("scoring %d artifacts, %d at once (%d threads each)", len(order), workers, threads)
        elif order and threads < runtime.cpu_threads():
            log.info(
                "scoring %s in a process of its own with %d threads, as beside another",
                selected[order[0]]["id"],
                threads,
            )
        for done, outcome in pool.run([jobs[index] for index in order], score_job, workers, threads):
            index = order[done]
            artifact = selected[index]
            result = scored_result(artifact, outcome)
            if result["status"] == "ok":
                scores.save(experiment, artifact["id"], keys[index], result)
            else:
                tracebacks[artifact["id"]] = result.pop("traceback")
            results[index] = finish_result(result, plans.get(artifact["id"], Plan()), test)
            progress.advance(summary_line(results[index], test.task_metric))
    return results


def read_artifacts(experiment: str) -> list[dict]:
    path = paths.artifacts_file(experiment)
    if not path.is_file():
        raise PipelineError(
            f"experiment '{experiment}' has no artifacts to score",
            where=paths.display(path),
            fix=f"run `{stages.make_command('fuse', experiment)}` (and "
            f"`{stages.make_command('quantize', experiment)}`) first",
        )
    return contracts.read_json(path, "artifacts")["artifacts"]


def resolve_task_metric(name: str, contract: dict, plugins: dict, references, tokenizer, ecfg) -> tuple[str, str]:
    """(the metric that decides, why): eval.task_metric, or for auto the one the data calls for (eval.verdict)."""
    if name == "auto":
        lengths = [len(tokenizer.encode(r, add_special_tokens=False)) for r in references]
        return verdict.choose_task_metric(
            contract["format"], references, lengths, contract.get("tool_schemas"), ecfg.max_tokens
        )
    available = (
        ["loss"]
        + [m for m in eval_metrics.BUILTIN if m not in eval_metrics.TOOL_METRICS or contract.get("tool_schemas")]
        + list(plugins)
    )
    if name not in available:
        raise PipelineError(
            f"eval.task_metric '{name}' is not measured for this data",
            where="config eval.task_metric",
            fix=f"use auto or one of: {', '.join(available)}",
        )
    return name, "set in eval.task_metric"


ANSWERED_AUTO, ANSWERED_AUTO_WHEN_LOSS_DECIDES = 100, 20


def answered_count(records: int, answer_records: int | str, task_metric: str) -> int:
    """How many test records are answered: eval.answer_records, or for auto 100 when the task metric is
    scored on answers and 20 when loss decides (the answers are then only shown, with chrF)."""
    if answer_records == "auto":
        answer_records = ANSWERED_AUTO_WHEN_LOSS_DECIDES if task_metric == "loss" else ANSWERED_AUTO
    return records if answer_records == -1 else min(records, answer_records)


def answer_caps(references: list[str], tokenizer, max_tokens: int) -> list[int]:
    """Each answered prompt's cap on new tokens: twice its reference's length and a margin, at most
    eval.max_tokens (an answer far longer than the reference scores no better, and costs the most)."""
    return [min(max_tokens, 2 * len(tokenizer.encode(r, add_special_tokens=False)) + 8) for r in references]


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one artifact is scored: with answers or not, its loss over every test record (None) or over
    the first `loss_records`, and for one scored on loss only, why."""

    answers: bool = True
    loss_records: int | None = None
    loss_only_reason: str | None = None


def scoring_plans(ecfg, artifacts, selected, experiment: str, task_metric: str, records: int) -> dict[str, Plan]:
    """{artifact id: Plan} for the artifacts not scored in full (any other gets Plan()). Under
    eval.proven: loss-only, an artifact a check already proved equal to the fused model, when it is
    scored too, generates nothing and its loss covers the first eval.proven_records test records only
    (8 by default: enough to catch a twin that is not one, at a fraction of the cost): base + adapter
    (fuse compares their logits and stops on a difference) and the float GGUF (quantize's export check
    found the fused model's greedy tokens on every check prompt). The adapter GGUF on the base GGUF,
    which quantize proved equal to the float GGUF, is scored the same way when loss decides; otherwise
    it answers every answered record, as the adapter route gives, with its loss on the first records."""
    if ecfg.proven != "loss-only":
        return {}
    first = records if ecfg.proven_records == -1 else min(records, ecfg.proven_records)
    plans = {aid: Plan(False, first, why) for aid, why in proven_twins(artifacts, selected, experiment).items()}
    check = passed_adapter_check(experiment) if any(a["kind"] == "gguf-adapter" for a in selected) else None
    for artifact in selected if check else []:
        if artifact["kind"] != "gguf-adapter":
            continue
        if task_metric == "loss":
            why = f"quantize found the fused float GGUF's greedy tokens on all {check['prompts']} check prompts"
            plans[artifact["id"]] = Plan(False, first, why)
        else:
            plans[artifact["id"]] = Plan(True, first)
    return plans


def proven_twins(artifacts: list[dict], selected: list[dict], experiment: str) -> dict[str, str]:
    """{artifact id: why} for the selected artifacts a check proved equal to the fused model, when it is
    selected too: base + adapter and the float GGUF (scoring_plans)."""
    by_id = {a["id"]: a for a in artifacts}
    fused = next((a for a in selected if a["kind"] == "fused"), None)
    if fused is None:
        return {}
    proven = {}
    if fused["parent"] in by_id and by_id[fused["parent"]]["kind"] == "adapter":
        proven[fused["parent"]] = "fuse proved its logits equal to the fused model's"
    check = (
        stages.read_manifest("quantize", experiment)["details"].get("export_check")
        if any(a["kind"] == "gguf" for a in selected)
        else None
    )
    if check and check["prompts"] and check["matching"] == check["prompts"]:
        for a in selected:
            if a["kind"] == "gguf" and a["parent"] == fused["id"]:
                proven[a["id"]] = (
                    f"quantize's export check found the fused model's greedy tokens on all {check['prompts']} "
                    "check prompts"
                )
    return {aid: why for aid, why in proven.items() if aid in {a["id"] for a in selected}}


def passed_adapter_check(experiment: str) -> dict | None:
    """quantize's adapter check (base GGUF + adapter GGUF against the fused float GGUF), if every prompt matched."""
    check = stages.read_manifest("quantize", experiment)["details"].get("adapter", {}).get("gguf", {}).get("check")
    return check if check and check["prompts"] and check["matching"] == check["prompts"] else None


def finish_result(result: dict, plan: Plan, test: TestSet) -> dict:
    """A scored (or failed) artifact's result with its task metrics and, for one scored on loss only, why."""
    if result["status"] == "ok":
        add_task_metrics(result, test.references, test.records, test.tool_schemas, test.plugins)
        if plan.loss_only_reason:
            result["loss_only_reason"] = plan.loss_only_reason
    return result


def add_task_metrics(result: dict, references, records, tool_schemas, plugins) -> None:
    """The task metrics of a scored artifact's answers (none for one scored on loss only), with their
    per-record values for the paired intervals. The answers stay in result["answers"]."""
    texts = result["answers"]
    if texts is None:
        result.pop("answers")
        result["metrics"] = {}
        return
    n = len(texts)
    table, per_record = eval_metrics.score_records(texts, references[:n], records[:n], tool_schemas, plugins)
    result["metrics"] = table
    result["per_record"] = {**result["per_record"], **per_record}


def read_tool_schemas(contract: dict) -> dict | None:
    if not contract.get("tool_schemas"):
        return None
    return orjson.loads(paths.resolve(contract["tool_schemas"]).read_bytes())


def load_tokenizer(artifacts: list[dict]):
    """The fine-tuned model's tokenizer (its chat template is not used: prompts are rendered with the contract's)."""
    by_kind = {a["kind"]: a for a in artifacts}
    return _tokenizer_at(paths.resolve((by_kind.get("fused") or by_kind["base"])["path"]))


@functools.lru_cache(maxsize=2)
def _tokenizer_at(folder: Path):
    return load_mlx_tokenizer(folder)


def prompts_and_references(records, contract, tokenizer) -> tuple[list[list[int]], list[str]]:
    pairs = [tokens.prompt_and_reference(r, contract, tokenizer) for r in records]
    return [p for p, _ in pairs], [r for _, r in pairs]


def loss_items_for(records, contract, tokenizer) -> dict[int, tuple]:
    """{record index: (token ids, loss mask)} for the records with at least one scored token."""
    items = {}
    for index, record in enumerate(records):
        ids, mask = tokens.encode(record, contract, tokenizer, mask_prompt=True)
        ids, mask = ids[: contract["max_seq_length"]], mask[: contract["max_seq_length"]]
        if mask[1:].sum() > 0:
            items[index] = (ids, mask)
    return items


def cached_result(experiment: str, artifact: dict, key: dict) -> dict | None:
    """The artifact's scores from an earlier run with the same key, described as the artifact is now."""
    result = scores.cached(experiment, artifact["id"], key)
    if result is None:
        return None
    return {**result, **{k: artifact[k] for k in ("id", "kind", "format", "path", "bytes")}, "cached": True}


def score_job(artifact, artifacts, prompts, loss_items, eval_section: dict, caps: list[int]) -> dict:
    """score_artifact with what a scoring process needs sent as plain data (eval.pool runs it in a child)."""
    tokenizer = load_tokenizer(artifacts)
    return score_artifact(artifact, artifacts, prompts, loss_items, tokenizer, OmegaConf.create(eval_section), caps)


def scored_result(artifact: dict, outcome) -> dict:
    """The result of a scoring job, or for a job whose process crashed (a PipelineError naming the signal)
    a failed result; any other exception is a bug in eval and is raised."""
    if not isinstance(outcome, BaseException):
        return outcome
    if not isinstance(outcome, SCORING_FAILURES):
        raise outcome
    result = {key: artifact[key] for key in ("id", "kind", "format", "path", "bytes")}
    trace = "".join(traceback.format_exception(outcome))
    return result | {"status": "failed", "error": first_line(outcome)[:500], "traceback": trace, "seconds": 0.0}


def score_artifact(artifact, artifacts, prompts, loss_items, tokenizer, ecfg, caps: list[int]) -> dict:
    """Loss on every record and answers to the first len(caps) prompts, each capped at its cap (no
    answers when caps is empty: scored on loss only). A failure of the model to load or run (SCORING_FAILURES) is
    recorded as status "failed" with its first line, and its traceback under "traceback"; any other
    exception is a bug in eval and is raised."""
    result = {key: artifact[key] for key in ("id", "kind", "format", "path", "bytes")}
    start = time.monotonic()
    try:
        if artifact["kind"] == "gguf":
            result.update(score_gguf(paths.resolve(artifact["path"]), prompts, loss_items, tokenizer, ecfg, caps))
        elif artifact["kind"] == "gguf-adapter":
            base, adapter = served.adapter_route(artifact, artifacts)
            result.update(score_gguf(base, prompts, loss_items, tokenizer, ecfg, caps, lora_path=adapter))
        else:
            result.update(score_mlx(artifact, artifacts, prompts, loss_items, tokenizer, ecfg, caps))
        result.update(status="ok", cached=False)
    except SCORING_FAILURES as exc:  # one broken artifact must not hide the others' scores
        log.debug("%s could not be scored:", artifact["id"], exc_info=exc)
        result.update(status="failed", error=first_line(exc)[:500], traceback="".join(traceback.format_exception(exc)))
    result["seconds"] = round(time.monotonic() - start, 2)
    gc.collect()
    return result


def first_line(exc: BaseException) -> str:
    """The exception's type and first line, with the project's paths shown relative to it."""
    text = str(exc).strip().replace(f"{paths.ROOT}{os.sep}", "")
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def failed_artifacts_error(results: list[dict], experiment: str, out_dir: Path) -> PipelineError:
    failed = [r for r in results if r["status"] == "failed"]
    named = "; ".join(f"{r['id']} ({r['error']})" for r in failed)
    return PipelineError(
        f"{len(failed)} of {len(results)} artifacts could not be scored: {named}",
        where=paths.display(out_dir / "report.md"),
        fix=f"the traceback is in {paths.display(out_dir / 'logs' / 'eval-error.log')}; fix the cause and run "
        f"`{stages.make_command('eval', experiment)}` again: it scores only what failed or changed",
    )


def write_error_log(path: Path, tracebacks: dict[str, str]) -> None:
    """Where the CLI leaves a bug's traceback: here, each artifact that could not be scored and why."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    text = "".join(f"{stamp} eval: {aid} could not be scored\n{trace}\n" for aid, trace in tracebacks.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    with contracts.atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def load_mlx(artifact: dict, artifacts: list[dict]):
    """The MLX model behind an artifact. On CPU a quantized model runs with its weights dequantized:
    the same values MLX's quantized kernels compute with, but through BLAS (those kernels are ~20×
    slower on CPU)."""
    by_id = {a["id"]: a for a in artifacts}
    if artifact["kind"] == "adapter":
        model, _ = load(
            str(paths.resolve(by_id[artifact["parent"]]["path"])), adapter_path=str(paths.resolve(artifact["path"]))
        )
    else:
        model, _ = load(str(paths.resolve(artifact["path"])))
    if artifact["kind"] == "mlx-quantized" and runtime.device_name() == "cpu":
        model = dequantize_model(model)
    model.eval()
    return model


def score_mlx(artifact, artifacts, prompts, loss_items, tokenizer, ecfg, caps: list[int]) -> dict:
    """Loss and answers, eval.batch_size records at a time: the loss pass over prompt + reference keeps
    each answered prompt's KV cache, and generation starts from it instead of computing the prompt again."""
    model = load_mlx(artifact, artifacts)
    per_item, seconds, generated = {}, 0.0, []
    on_cpu = runtime.device_name() == "cpu"
    with fast_exp.scoring_activations(model) if on_cpu else contextlib.nullcontext():
        for first in range(0, len(prompts), ecfg.batch_size):
            chunk = list(range(first, min(first + ecfg.batch_size, len(prompts))))
            scored = [j for j in chunk if j in loss_items]
            answered = [j for j in chunk if j < len(caps)]
            keep = {
                k: len(prompts[j])
                for k, j in enumerate(scored)
                if j < len(caps) and _starts_with(loss_items[j][0], prompts[j])
            }
            nll, caches = mlx_nll(model, [loss_items[j] for j in scored], ecfg.loss_batch_size, keep)
            per_item.update(zip(scored, nll))
            rows = {scored[k]: layers for k, layers in caches.rows.items()}
            start = time.monotonic()
            if answered:
                cached = caches if all(j in rows for j in answered) else None
                generated += mlx_generate(
                    model,
                    tokenizer,
                    [prompts[j] for j in answered],
                    ecfg,
                    cached and PromptCaches(cached.prefix_length, cached.prefix, [rows[j] for j in answered]),
                    [caps[j] for j in answered],
                )
            seconds += time.monotonic() - start
            del caches, rows
    del model
    mx.clear_cache()
    return {"engine": "mlx", **loss_fields(per_item), **answers_and_speed(generated, tokenizer, seconds, caps)}


@dataclasses.dataclass
class PromptCaches:
    """What a loss pass leaves for generation: the prefix every item shared (its length and each layer's
    keys and values, batch 1; None when there is none) and, per kept item, each layer's keys and values
    of its prompt after the prefix but the last token (`rows`: {item index: layers}, or a list in the
    order of the prompts)."""

    prefix_length: int
    prefix: list[tuple] | None
    rows: dict[int, list[tuple]] | list[list[tuple]]


def _starts_with(ids, prompt: list[int]) -> bool:
    return len(prompt) < len(ids) and ids[: len(prompt)].tolist() == list(prompt)


def mlx_loss(model, items, batch_size: int) -> float:
    """Token-weighted mean loss over every item (the trained tokens only)."""
    per_item, _ = mlx_nll(model, items, batch_size)
    count = sum(n for _, n in per_item)
    return sum(nll for nll, _ in per_item) / count if count else float("nan")


def mlx_nll(model, items, batch_size: int, keep: dict[int, int] | None = None) -> tuple[list, PromptCaches]:
    """Each item's (summed loss over its trained tokens, their count), and for each item index in
    `keep` ({index: prompt length}) the KV cache of its prompt but the last token, ready for generation.

    The prefix all items share (the system prompt) is run once and its KV cache reused by every
    batch, and the output layer is applied only where a token is scored: on CPU, where MLX's exp
    is slow, that is most of the cost.
    """
    if not items:
        return [], PromptCaches(0, None, {})
    prefix = shared_prefix_length(items)
    prefix_cache = _prefix_cache(model, items[0][0][:prefix]) if prefix else None
    keep = keep if keep and shared_prefix.supported(model) else {}
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    per_item, kept = [(0.0, 0)] * len(items), {}
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = [items[i] for i in indices]
        width = max(len(ids) for ids, _ in batch) - prefix - 1
        inputs = np.zeros((len(batch), width), np.int32)
        targets, rows, cols = [], [], []
        for row, (ids, mask) in enumerate(batch):
            suffix = ids[prefix:-1]
            inputs[row, : len(suffix)] = suffix
            scored = np.nonzero(mask[prefix + 1 :])[0]
            rows += [row] * len(scored)
            cols += scored.tolist()
            targets += ids[prefix + 1 :][scored].tolist()
        cache = _tiled_cache(prefix_cache, len(batch)) if prefix_cache else (make_prompt_cache(model) if keep else None)
        hidden = model.model(mx.array(inputs), cache=cache)
        logits = _output_layer(model, hidden[mx.array(rows), mx.array(cols)]).astype(mx.float32)
        target_logits = np.array(mx.take_along_axis(logits, mx.array(targets)[:, None], axis=-1)[:, 0], np.float64)
        nll = _logsumexp(logits) - target_logits
        sums = np.bincount(rows, weights=nll, minlength=len(batch))
        counts = np.bincount(rows, minlength=len(batch))
        for row, index in enumerate(indices):
            per_item[index] = (float(sums[row]), int(counts[row]))
            if index in keep:
                kept[index] = _own_part(cache, row, prefix, keep[index] - 1)
    shared = [c.keys_and_values() for c in prefix_cache] if prefix_cache and kept else None
    return per_item, PromptCaches(prefix if shared else 0, shared, kept)


def _logsumexp(logits) -> np.ndarray:
    if runtime.device_name() == "cpu":
        return cpu_activations.logsumexp(logits)
    return np.array(mx.logsumexp(logits, axis=-1), np.float64)


def _own_part(cache, row: int, start: int, end: int) -> list[tuple]:
    """Each layer's keys and values of one row of a batch KV cache, positions start .. end - 1 (batch 1)."""
    layers = []
    for layer in cache:
        keys, values = layer.keys_and_values()
        layers.append(
            (mx.contiguous(keys[row : row + 1, :, start:end]), mx.contiguous(values[row : row + 1, :, start:end]))
        )
    mx.eval(layers)
    return layers


def _prefix_cache(model, prefix_ids):
    cache = make_prompt_cache(model)
    model.model(mx.array([list(map(int, prefix_ids))]), cache=cache)
    mx.eval([c.keys_and_values() for c in cache])
    return cache


def _tiled_cache(cache, batch: int):
    """The batch-1 prefix cache repeated for `batch` rows (each layer's keys and values)."""
    tiled = []
    for layer in cache:
        keys, values = layer.keys_and_values()
        copy_ = KVCache()
        copy_.state = (mx.repeat(keys, batch, axis=0), mx.repeat(values, batch, axis=0), layer.offset)
        tiled.append(copy_)
    return tiled


def _output_layer(model, hidden):
    if getattr(model, "args", None) is not None and getattr(model.args, "tie_word_embeddings", False):
        return model.model.embed_tokens.as_linear(hidden)
    return model.lm_head(hidden)


def mlx_generate(model, tokenizer, prompts, ecfg, cached: PromptCaches | None = None, caps=None) -> list[list[int]]:
    """Batched answers. With the prompts' caches from a loss pass (`cached`, rows in prompt order), only
    each prompt's last token is fed. Where the model allows (lm.shared_prefix), the prompts' shared prefix
    (the system prompt) is held once and not per row; otherwise mlx-lm's batch_generate answers."""
    caps = caps if caps is not None else [ecfg.max_tokens] * len(prompts)
    mx.random.seed(ecfg.seed)
    sampler = make_sampler(temp=ecfg.temperature, top_p=ecfg.top_p)
    if shared_prefix.supported(model):
        return shared_prefix.generate(
            model,
            prompts,
            caps,
            set(tokenizer.eos_token_ids),
            None if ecfg.temperature == 0 else lambda logits: sampler(logits - mx.logsumexp(logits, -1, keepdims=True)),
            shared=cached and (cached.prefix_length, cached.prefix),
            own=cached and cached.rows,
        )
    response = batch_generate(
        model,
        tokenizer,
        prompts,
        max_tokens=caps,
        sampler=sampler,
        completion_batch_size=ecfg.batch_size,
        prefill_batch_size=ecfg.batch_size,
        return_token_ids=True,
    )
    return [list(map(int, ids)) for ids in response.token_ids]


def score_gguf(path: Path, prompts, loss_items, tokenizer, ecfg, caps: list[int], lora_path: Path | None = None):
    """Loss and answers of a GGUF in llama.cpp (with `lora_path`, a LoRA adapter GGUF applied to it)."""
    per_item = {}
    if loss_items:
        nll = llama_runner.perplexity(path, list(loss_items.values()), lora_path)["per_item"]
        per_item = dict(zip(loss_items, nll))
    stop_ids, answered = set(tokenizer.eos_token_ids), prompts[: len(caps)]
    start = time.monotonic()
    if not answered:
        generated = []
    elif ecfg.temperature == 0:
        generated = []
        for first in range(0, len(answered), ecfg.batch_size):
            chunk = answered[first : first + ecfg.batch_size]
            most = max(caps[first : first + len(chunk)])
            generated += llama_runner.greedy_batch(path, chunk, most, stop_ids, lora_path)
        generated = [ids[:cap] for ids, cap in zip(generated, caps)]  # greedy: the first `cap` tokens stand
    else:
        llm = llama_runner.open_llama(path, max(map(len, answered)) + ecfg.max_tokens + 8, lora_path)
        generated = [
            llama_runner.sample(llm, p, cap, stop_ids, ecfg.temperature, ecfg.top_p, ecfg.seed)
            for p, cap in zip(answered, caps)
        ]
        del llm
    seconds = time.monotonic() - start
    return {"engine": "llama.cpp", **loss_fields(per_item), **answers_and_speed(generated, tokenizer, seconds, caps)}


def loss_fields(per_item: dict[int, tuple[float, int]]) -> dict:
    """Token-weighted test loss and perplexity, and each record's [summed NLL, tokens] (record order)."""
    count = sum(n for _, n in per_item.values())
    loss = sum(nll for nll, _ in per_item.values()) / count if count else float("nan")
    return {
        "loss": round(loss, 6),
        "perplexity": round(math.exp(loss), 6) if math.isfinite(loss) else None,
        "per_record": {"loss": [[round(nll, 6), n] for _, (nll, n) in sorted(per_item.items())]},
    }


def answers_and_speed(generated: list[list[int]], tokenizer, seconds: float, caps: list[int]) -> dict:
    """Decoded answers and generation speed; answers None and no speed when nothing was generated."""
    if not caps:
        return {"answers": None, "generation": None}
    stop_ids = set(tokenizer.eos_token_ids)
    answers = [tokenizer.decode([t for t in ids if t not in stop_ids]).strip() for ids in generated]
    tokens = sum(len(ids) for ids in generated)
    capped = sum(1 for ids, cap in zip(generated, caps) if len(ids) >= cap and ids[-1] not in stop_ids)
    return {
        "answers": answers,
        "generation": {
            "seconds": round(seconds, 2),
            "tokens": tokens,
            "tokens_per_second": round(tokens / seconds, 2) if seconds else None,
            "hit_token_cap": capped,
        },
    }


def summary_line(result: dict, task_metric: str) -> str:
    if result["status"] != "ok":
        return f"{result['id']}: FAILED ({result['error'][:120]})"
    metric = "" if task_metric == "loss" else f"  {task_metric} {result['metrics'].get(task_metric, {}).get('value')}"
    speed = f", {result['generation']['tokens_per_second']} tok/s" if result["generation"] else ", loss only"
    timing = "cached: scored by an earlier run" if result.get("cached") else f"{result['seconds']:.0f} s{speed}"
    loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"  # NaN (no scored token) is null in JSON
    return f"{result['id']}: loss {loss}{metric}  ({timing})"


def add_deltas(results: list[dict], task_metric: str) -> None:
    """Each artifact's change against the base model, metric by metric (points; loss in nats, over the
    records both were scored on)."""
    base = next((r for r in results if r["kind"] == "base" and r["status"] == "ok"), None)
    for result in results:
        if result["status"] != "ok" or base is None:
            result["delta_vs_base"] = None
            continue
        deltas = {
            name: _difference(m["value"], base["metrics"].get(name, {}).get("value"))
            for name, m in result["metrics"].items()
        }
        records = len(result["per_record"]["loss"])
        deltas["loss"] = _difference(result["loss"], loss_of_first(base, records))
        result["delta_vs_base"] = deltas


def loss_of_first(result: dict, records: int) -> float | None:
    """The token-weighted loss of `result` over its first `records` scored records (a proven twin is
    scored on a prefix of the records the others are scored on)."""
    pairs = result["per_record"]["loss"][:records]
    tokens = sum(n for _, n in pairs)
    return round(sum(nll for nll, _ in pairs) / tokens, 6) if tokens else None


def _difference(value, reference):
    return None if value is None or reference is None else round(value - reference, 4)


def metrics_document(experiment, contract, records, results, task: tuple[str, str], skipped) -> dict:
    return {
        "experiment": experiment,
        "status": "skipped" if skipped else "ok",
        "reason": skipped,
        "test_split": contract["splits"]["test"],
        "test_records": len(records),
        "task_metric": task[0],
        "task_metric_reason": task[1],
        "artifacts": results,
    }


def generation_policy(experiment, results, contract, tokenizer, ecfg, task_metric: str, skipped) -> dict:
    """Which artifact to ship under eval.ship (eval.verdict.ship_decision) and how to prompt it."""
    decision = verdict.ship_decision(results, task_metric, ecfg.ship)
    return {
        "experiment": experiment,
        **decision,
        "reason": skipped or decision["reason"],
        "generation": {
            "template_id": contract["template"]["id"],
            "template_sha256": contract["template"]["sha256"],
            "stop_tokens": [tokenizer.convert_ids_to_tokens(t) for t in sorted(tokenizer.eos_token_ids)],
            "temperature": ecfg.temperature,
            "top_p": ecfg.top_p,
            "max_tokens": ecfg.max_tokens,
            "seed": ecfg.seed,
        },
    }


def write_generations(path: Path, prompts, references, answers: dict[str, list[str]], tokenizer) -> None:
    """One line per answered record (the first eval.answer_records) with every artifact's answer."""
    answered = min((len(texts) for texts in answers.values()), default=0)
    with contracts.atomic_path(path) as tmp, open(tmp, "wb") as f:
        for index, (prompt, reference) in enumerate(zip(prompts[:answered], references)):
            row = {
                "index": index,
                "prompt": tokenizer.decode(prompt),
                "reference": reference,
                "outputs": {aid: texts[index] for aid, texts in answers.items()},
            }
            f.write(orjson.dumps(row) + b"\n")
