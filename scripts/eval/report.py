"""eval's report: report.md with its charts (PNG) for one experiment, and eval_out/summary.md across experiments.

The first screen of report.md answers "did fine-tuning help, by how much, and what ships"; the
table, charts, training facts and side-by-side examples follow.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline import contracts, paths

import matplotlib
import orjson

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

METRIC_COLUMNS = ("exact_match", "normalized_match", "chrf", "json_valid", "schema_valid", "tool_match", "call_f1")
LABELS = {
    "loss": "test loss",
    "exact_match": "exact",
    "normalized_match": "normalized",
    "chrf": "chrF",
    "json_valid": "JSON valid",
    "schema_valid": "schema valid",
    "tool_match": "right tool",
    "call_f1": "call F1",
}
MEANINGS = {
    "loss": "mean negative log-likelihood of the reference answer tokens (lower is better; perplexity is its exp)",
    "exact_match": "the answer is the reference, character for character",
    "normalized_match": "the answer equals the reference as JSON values, or as text with case, spacing and "
    "punctuation folded",
    "chrf": "character n-gram overlap with the reference (sacrebleu chrF)",
    "json_valid": "the answer is one JSON document",
    "schema_valid": "the answer is a tool call whose arguments satisfy that tool's JSON Schema",
    "tool_match": "the answer calls the reference's tool",
    "call_f1": "the right tool with the right arguments (F1 over argument name/value pairs, 0 for a wrong tool)",
}


def write_report(out_dir: Path, experiment: str, metrics: dict, policy: dict, run_dir: Path, contract: dict) -> None:
    lines = [f"# Eval: {experiment}", ""]
    if metrics["status"] == "skipped":
        lines += [
            f"**Skipped:** {metrics['reason']}.",
            "",
            "Add records to the test split (data.splits.test, or a test file) and run `make eval` again.",
        ]
    else:
        ok = [a for a in metrics["artifacts"] if a["status"] == "ok"]
        charts = write_charts(out_dir, metrics, run_dir)
        lines += verdict(metrics, policy) + [""]
        lines += metric_table(metrics) + [""]
        lines += ship_table(policy, metrics["task_metric"])
        lines += [f"![{title}]({name})" for name, title in charts if name != "loss_curve.png"] + [""]
        lines += training_facts(run_dir, contract) + [""]
        if "loss_curve.png" in dict(charts):
            lines += ["![training and validation loss](loss_curve.png)", ""]
        lines += examples(out_dir / "final_generations.jsonl", ok, policy, metrics) + [""]
        lines += failures(metrics) + settings(policy)
    contracts.write_bytes_atomic(out_dir / "report.md", ("\n".join(lines).rstrip() + "\n").encode("utf-8"))


def _value(artifact: dict, metric: str):
    """An artifact's figure on a metric: points, or for loss its test loss."""
    if metric == "loss":
        return artifact.get("loss")
    return (artifact.get("metrics") or {}).get(metric, {}).get("value")


ANSWERS = {
    "Yes": "Yes.",
    "No": "No: it got worse.",
    "Can't tell": "Can't tell: the difference is within the noise.",
}


def verdict(metrics: dict, policy: dict) -> list[str]:
    task, result = metrics["task_metric"], metrics.get("verdict") or {}
    lines = []
    if result.get("answer") in ANSWERS:
        lines.append(f"**Did fine-tuning help? {ANSWERS[result['answer']]}** {_difference_sentence(task, result)}")
    else:
        lines.append(
            "**Did fine-tuning help?** Not measured: the base or the fine-tuned model could not be scored (see "
            "Failures)."
        )
    reason = metrics.get("task_metric_reason") or "set in eval.task_metric"
    lines += ["", f"Decided by {LABELS.get(task, task)} (`{task}`): {reason}."]
    ship = policy["ship"]
    if ship:
        lines += [
            "",
            f"**Ship:** `{ship['path']}` ({ship['format']}, {human_bytes(ship['bytes'])}"
            f"{'' if ship['task_metric'] is None else ', ' + _figure(task, ship['task_metric'])}): {policy['reason']}.",
        ]
    else:
        lines += ["", f"**Ship:** nothing qualifies: {policy['reason']}."]
    return lines


def _figure(task: str, value: float) -> str:
    if task == "loss":
        return f"test loss {value:.3f}, perplexity {math.exp(value):.2f}"
    return f"{task} {value:.1f}"


def _difference_sentence(task: str, v: dict) -> str:
    """The figures behind the answer: base → fine-tuned, the difference and its 95% paired interval."""
    n = f"{v['records']} test records"
    if task == "loss":
        return (
            f"Test loss on {n}: base {v['base']:.3f} → fine-tuned ({v['tuned_kind']}) {v['tuned']:.3f}; perplexity "
            f"{math.exp(v['base']):.2f} → {math.exp(v['tuned']):.2f}, ×{v['perplexity_ratio']:.3f} "
            f"(95% interval ×{v['perplexity_ratio_low']:.3f} to ×{v['perplexity_ratio_high']:.3f}, paired bootstrap)."
        )
    return (
        f"{LABELS.get(task, task)} on {n}: base {v['base']:.1f} → fine-tuned ({v['tuned_kind']}) {v['tuned']:.1f} "
        f"({v['difference']:+.1f} points, 95% interval {v['low']:+.1f} to {v['high']:+.1f}, paired bootstrap); "
        f"test loss {v['base_loss']:.3f} → {v['tuned_loss']:.3f}."
    )


def metric_table(metrics: dict) -> list[str]:
    task = metrics["task_metric"]
    extra = sorted({m for a in metrics["artifacts"] for m in (a.get("metrics") or {})} - set(METRIC_COLUMNS))
    columns = [m for m in METRIC_COLUMNS if any(m in (a.get("metrics") or {}) for a in metrics["artifacts"])] + extra
    header = [
        "artifact",
        "size",
        "test loss",
        "perplexity",
        *[LABELS.get(c, c) for c in columns],
        f"Δ {LABELS.get(task, task)} vs base",
        "tok/s",
    ]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    most = max((_loss_records(a) for a in metrics["artifacts"] if a["status"] == "ok"), default=0)
    for a in metrics["artifacts"]:
        if a["status"] != "ok":
            rows.append(
                f"| {a['id']} | {human_bytes(a['bytes'])} | failed | " + " | ".join([""] * (len(header) - 3)) + " |"
            )
            continue
        values = [_cell(a, c) for c in columns]
        delta = (a.get("delta_vs_base") or {}).get(task)
        speed = (a.get("generation") or {}).get("tokens_per_second")
        rows.append(
            f"| {a['id']} | {human_bytes(a['bytes'])} | {_fmt(a['loss'], 4)}{_subset(a, most)} | "
            f"{_fmt(a['perplexity'], 3)} | " + " | ".join(values) + f" | {_signed(delta, task)} | {_fmt(speed)} |"
        )
    meaning = f" {LABELS.get(task, task)}: {MEANINGS[task]}." if task in MEANINGS else ""
    return [
        f"Metrics in points (0–100, higher is better); loss and perplexity on the answer tokens of "
        f"{metrics['test_records']} test records.{meaning}",
        "",
        *rows,
        "",
        *what_was_generated(metrics),
    ]


def _loss_records(artifact: dict) -> int:
    return len(artifact["per_record"]["loss"])


def _subset(artifact: dict, most: int) -> str:
    """A marker on a loss measured on fewer records than the others (a proven twin's)."""
    return f" ({_loss_records(artifact)} rec.)" if _loss_records(artifact) < most else ""


def ship_table(policy: dict, task: str) -> list[str]:
    """Each shippable artifact against the ship rule's reference, with its paired interval."""
    rows = policy.get("comparisons") or []
    if not rows:
        return []
    lines = [
        f"## Ship rule: against `{policy['rule']['reference']}`",
        "",
        "| artifact | judged by | difference | 95% interval | qualifies |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        metric, ok = r.get("metric", task), "yes" if r["qualifies"] else "no"
        if "difference" not in r:
            lines.append(f"| {r['id']} | {metric} | – | – | no (not measured) |")
        elif metric == "loss":
            lines.append(
                f"| {r['id']} | perplexity | ×{r['perplexity_ratio']:.3f} | ×{r['perplexity_ratio_low']:.3f} to "
                f"×{r['perplexity_ratio_high']:.3f} | {ok} |"
            )
        else:
            lines.append(
                f"| {r['id']} | {metric} | {r['difference']:+.1f} points | {r['low']:+.1f} to {r['high']:+.1f} | {ok} |"
            )
    return lines + [""]


def _signed(delta, task: str) -> str:
    return "" if delta is None else f"{delta:+.3f}" if task == "loss" else f"{delta:+.1f}"


def _cell(artifact: dict, metric: str) -> str:
    entry = (artifact.get("metrics") or {}).get(metric)
    if entry is None:
        return "–"
    return _fmt(entry["value"]) if entry["status"] == "ok" else "failed"


def what_was_generated(metrics: dict) -> list[str]:
    """Which artifacts answered the test prompts and which were scored on loss only, and why."""
    answered = [a["id"] for a in metrics["artifacts"] if a["status"] == "ok" and a.get("generation")]
    loss_only = [a for a in metrics["artifacts"] if a["status"] == "ok" and not a.get("generation")]
    lines = [
        f"Answers generated for {metrics.get('answered_records', metrics['test_records'])} of "
        f"{metrics['test_records']} test records by {', '.join(f'`{i}`' for i in answered) or 'no artifact'}."
    ]
    if loss_only:
        records = min(_loss_records(a) for a in loss_only)
        lines.append(
            f"Scored on loss only, over the first {records} test records (eval.proven_records; its Δ is against "
            "the base model on the same records): "
            + ", ".join(f"`{a['id']}` ({a.get('loss_only_reason', 'loss only')})" for a in loss_only)
            + " (eval.proven=answers scores them in full)."
        )
    most = max((_loss_records(a) for a in metrics["artifacts"] if a["status"] == "ok"), default=0)
    partial = [a for a in metrics["artifacts"] if a["status"] == "ok" and a.get("generation")]
    partial = [a for a in partial if _loss_records(a) < most]
    if partial:
        lines.append(
            "Loss over the first "
            + ", ".join(f"{_loss_records(a)} test records for `{a['id']}`" for a in partial)
            + " (quantize proved the adapter GGUF on the base GGUF answers like the fused float GGUF; "
            "eval.proven=answers measures it on all)."
        )
    return lines


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def human_bytes(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def training_facts(run_dir: Path, contract: dict) -> list[str]:
    lines = ["## What was trained", ""]
    train_path, model_path = run_dir / "train.manifest.json", paths.MODEL_MANIFEST
    if model_path.is_file():
        model = contracts.read_json(model_path, "run_manifest")
        lines.append(
            f"- Base model: `{model['config']['model']['source']}` "
            f"({model['details'].get('parameters', 0) / 1e6:.0f}M parameters, {model['details'].get('dtype')})"
        )
    sources = ", ".join(f"`{s['source']}` ({s['records']} records)" for s in contract["sources"])
    lines.append(f"- Data: {sources}; format {contract['format']}, chat template `{contract['template']['id']}`")
    if train_path.is_file():
        train = contracts.read_json(train_path, "run_manifest")
        t, d = train["config"]["train"], train["details"]
        lines.append(
            f"- Training: {t['fine_tune_type']} (rank {t['lora']['rank']}, {t['num_layers']} layers), "
            f"{d.get('steps')} steps of batch {t['batch_size']}, "
            f"lr {t['learning_rate']:g} {t['lr_schedule']}, {d.get('trained_tokens')} trained tokens in "
            f"{train['wall_seconds']:.0f} s"
        )
        if d.get("first_val_loss") is not None:
            lines.append(
                f"- Validation loss {d['first_val_loss']:.3f} → {d['best_val_loss']:.3f} (best at step "
                f"{d.get('best_step')}){', stopped early' if d.get('stopped_early') else ''}"
            )
    return lines


def examples(
    generations_path: Path, ok: list[dict], policy: dict, metrics: dict, count: int | None = None
) -> list[str]:
    by_kind = {a["kind"]: a["id"] for a in ok}
    base_id = by_kind.get("base")
    tuned_id = (policy["ship"] or {}).get("id") or by_kind.get("fused")
    if not (generations_path.is_file() and base_id and tuned_id):
        return []
    rows = [orjson.loads(line) for line in generations_path.read_text(encoding="utf-8").splitlines()]
    count = count if count is not None else metrics.get("examples", 4)
    lines = [f"## Examples: base vs `{tuned_id}`", ""]
    for row in rows[:count]:
        lines += [
            f"**Prompt {row['index']}** (end): `{_one_line(row['prompt'][-160:])}`",
            "",
            "| | answer |",
            "|---|---|",
            f"| reference | `{_one_line(row['reference'])}` |",
            f"| base | `{_one_line(row['outputs'].get(base_id, ''))}` |",
            f"| fine-tuned | `{_one_line(row['outputs'].get(tuned_id, ''))}` |",
            "",
        ]
    return lines


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.replace("|", "\\|").replace("`", "'").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def failures(metrics: dict) -> list[str]:
    lines = []
    for a in metrics["artifacts"]:
        if a["status"] != "ok":
            lines.append(f"- `{a['id']}` could not be scored: {a['error']}")
        for name, m in (a.get("metrics") or {}).items():
            if m["status"] != "ok":
                lines.append(f"- metric `{name}` failed on `{a['id']}`: {m.get('error')}")
    return ["## Failures", "", *lines, ""] if lines else []


def settings(policy: dict) -> list[str]:
    g = policy["generation"]
    return [
        "## Generation settings",
        "",
        f"template `{g['template_id']}` (sha256 {g['template_sha256'][:12]}…), stop tokens "
        f"{', '.join(f'`{t}`' for t in g['stop_tokens'])}, "
        f"temperature {g['temperature']}, top_p {g['top_p']}, at most {g['max_tokens']} new tokens, seed {g['seed']}.",
    ]


def write_charts(out_dir: Path, metrics: dict, run_dir: Path) -> list[tuple[str, str]]:
    charts = [("task_metric.png", f"{metrics['task_metric']} per artifact"), ("size_vs_quality.png", "size vs quality")]
    ok = [a for a in metrics["artifacts"] if a["status"] == "ok" and _value(a, metrics["task_metric"]) is not None]
    _bar_chart(out_dir / "task_metric.png", ok, metrics["task_metric"])
    _size_chart(out_dir / "size_vs_quality.png", ok, metrics["task_metric"])
    if _loss_chart(out_dir / "loss_curve.png", run_dir / "metrics.jsonl"):
        charts.append(("loss_curve.png", "loss curve"))
    return charts


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with contracts.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _chart_value(artifact: dict, task: str) -> float:
    return artifact["perplexity"] if task == "loss" else _value(artifact, task)


def _axis_label(task: str) -> str:
    return "test perplexity (lower is better)" if task == "loss" else f"{task} (points)"


def _bar_chart(path: Path, ok: list[dict], task: str) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(ok) + 1.4))
    names = [a["id"].split("/", 1)[-1] for a in ok]
    values = [_chart_value(a, task) for a in ok]
    colors = [
        "#999999" if a["kind"] == "base" else "#2a7ab9" if a["kind"] in ("adapter", "fused") else "#e08a1e" for a in ok
    ]
    ax.barh(names[::-1], values[::-1], color=colors[::-1])
    top = max(values, default=1) * 1.15 if task == "loss" else 105
    for y, v in enumerate(values[::-1]):
        ax.text(v + top / 100, y, f"{v:.2f}" if task == "loss" else f"{v:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, top)
    ax.set_xlabel(_axis_label(task))
    ax.set_title(f"{'perplexity' if task == 'loss' else task} per artifact")
    _save(fig, path)


def _size_chart(path: Path, ok: list[dict], task: str) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for a in sorted(ok, key=lambda a: a["bytes"]):
        ax.scatter(a["bytes"] / 1e6, _chart_value(a, task), s=40, label=a["id"].split("/", 1)[-1])
    ax.legend(fontsize=7, loc="best")  # a legend, not labels by the points: artifacts of one size crowd together
    ax.set_xscale("log")
    ax.set_xlabel("size (MB, log scale)")
    ax.set_ylabel(_axis_label(task))
    if task != "loss":
        ax.set_ylim(-5, 105)
    ax.set_title("size vs quality")
    _save(fig, path)


def _loss_chart(path: Path, metrics_path: Path) -> bool:
    if not metrics_path.is_file():
        return False
    rows = [orjson.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r["type"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r["type"] == "val"]
    if not (train or val):
        return False
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    if train:
        ax.plot(*zip(*train), label="train", marker=".")
    if val:
        ax.plot(*zip(*val), label="validation", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("training and validation loss")
    _save(fig, path)
    return True
