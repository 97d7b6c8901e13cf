"""summary stage: every experiment side by side, after `make all`.

Reads the config's experiments (and sweep), each experiment's runs/<experiment>/train.manifest.json,
eval_out/<experiment>/metrics.json and generation_policy.json, and the failure records stages leave
in their logs/ folders. Writes runs/experiments.csv (one experiment_row per experiment: what it
varies, how training went, each artifact's test loss and task metric, what it ships),
eval_out/summary.md with its charts in eval_out/summary/, eval_out/summary.html (the same, one
self-contained page) and, last, eval_out/summary.manifest.json.
An experiment that failed or did not finish is a row too; the stage then exits non-zero naming it,
after writing the table, so `make all` ends with one line saying which experiments to look at.
"""

from __future__ import annotations

import base64
import csv
import io
import logging
import math
import re
import statistics
import sys
from pathlib import Path

import pipeline  # noqa: F401
from pipeline import cli, config, contracts, paths, stages, study
from pipeline.errors import PipelineError
from pipeline.experiments import SEED_KEY, format_value
from pipeline.manifest import StageRun, file_entry

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import orjson  # noqa: E402
from markdown_it import MarkdownIt  # noqa: E402

log = logging.getLogger("summary")
CHART_DIR = "summary"  # under eval_out/
LOWER_IS_BETTER = {"loss", "perplexity"}
NOT_SETTINGS = (SEED_KEY, "train.init_from")  # columns of their own
# the stages whose failure fails an experiment
EXPERIMENT_STAGES = ("model", "prepare", "train", "fuse", "quantize", "eval", "package")
FIXED_COLUMNS = (
    "schema_version",
    "experiment",
    "status",
    "failed_stage",
    "reason",
    "seed",
    "init_from",
    "steps",
    "first_val_loss",
    "best_val_loss",
    "tokens_per_second",
    "train_seconds",
    "peak_memory_gb",
    "task_metric",
    "base_task",
    "fused_task",
    "verdict",
    "interval_low",
    "interval_high",
    "ship",
    "ship_bytes",
    "adapter_sha256",
)


def build_parser():
    return cli.stage_parser("summary", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("summary", args, lambda cfg: run(cfg, config.load_workspace(args.overrides, args.override)))


def run(cfg, workspace) -> Path:
    stage = StageRun("summary", {s: config.section(cfg, s) for s in ("experiments", "sweep")})
    asked = any(config._sets(layer, ("experiment", "name")) for _, layer in workspace.layers[1:])
    selected = [workspace.selected()] if asked else workspace.names()
    varied = list(dict.fromkeys(k for e in workspace.experiments for k in e.varied if k not in NOT_SETTINGS))
    rows = [experiment_row(e.name, e.varied, workspace.config(e.name), varied) for e in workspace.experiments]
    csv_path, md_path, chart_dir = paths.EXPERIMENTS_CSV, paths.EVAL_SUMMARY, paths.EVAL_DIR / CHART_DIR
    html_path = md_path.with_suffix(".html")
    staged_csv, staged_md, staged_charts = stage.staged(csv_path), stage.staged(md_path), stage.staged(chart_dir)
    write_csv(staged_csv, rows, varied)
    staged_charts.mkdir(parents=True)
    charts = write_charts(staged_charts, rows, varied)
    markdown = summary_markdown(rows, varied, charts, workspace.search and search_line(workspace.search))
    staged_md.write_text(markdown, encoding="utf-8")
    stage.staged(html_path).write_text(summary_html(markdown, staged_charts), encoding="utf-8")
    unfinished = [r for r in rows if r["experiment"] in selected and r["status"] != "ok"]
    manifest_path = paths.EVAL_DIR / "summary.manifest.json"
    if unfinished:
        stage.staging.commit(manifest_path, lambda path: None)  # the table shows them; no manifest vouches for it
        raise PipelineError(
            f"{len(unfinished)} of {len(selected)} experiments did not complete: "
            + "; ".join(
                f"{r['experiment']} ({r['failed_stage']}: {r['reason']})"
                if r["failed_stage"]
                else f"{r['experiment']} ({r['reason']})"
                for r in unfinished
            ),
            where=paths.display(csv_path),
            fix="fix each as its error says and run `make all` again: it re-runs only what failed or changed",
        )
    inputs = []
    for name in selected:
        for stage_name in ("train", "eval"):
            inputs.append(file_entry(f"{stage_name}_manifest", stages.get(stage_name).manifest_path(name)))
    outputs = [
        stage.entry("experiments_csv", csv_path),
        stage.entry("summary", md_path),
        stage.entry("summary_html", html_path),
        stage.entry("charts", chart_dir),
    ]
    best = ranked(rows)[0] if rows else None
    stage.finish(manifest_path, inputs, outputs, {"experiments": len(rows), "best": best and best["experiment"]})
    log.info("summary: %s (%d experiments; best %s)", paths.display(md_path), len(rows), best and best["experiment"])
    return md_path


def search_line(search) -> str:
    """What the search found: its study, how many trials ran and the best by the metric it optimized
    (validation loss: the table's ranking by the test split can differ, which is the point of keeping it)."""
    trials = study.trials(search)
    complete = [t for t in trials if t.value is not None]
    text = (
        f"Hyperparameter search (study {search.study_name}): {len(trials)} of {search.trials} trials "
        f"({len(complete)} complete; Optuna TPE, `{paths.display(study.storage_path())}`)."
    )
    if complete:
        pick = min if search.direction == "minimize" else max
        best = pick(complete, key=lambda t: t.value)
        text += f" Best by {search.metric}: `{best.experiment}` ({best.value:.4f})."
    return text


# --- one row per experiment -------------------------------------------------------------------------


def experiment_row(name: str, settings: dict, cfg, varied: list[str]) -> dict:
    row = {"schema_version": contracts.schema_version("experiment_row"), "experiment": name}
    row.update({key: settings.get(key, _value(cfg, key)) for key in varied})
    row["seed"] = int(cfg.train.seed)
    row["init_from"] = cfg.train.init_from  # the experiment whose adapter it continued, if any
    failure = first_failure(cfg)
    train = _manifest("train", name)
    metrics, policy = _eval_outputs(name)
    if failure:
        row.update(status="failed", failed_stage=failure["stage"], reason=failure["error"])
    elif train is None or metrics is None:
        row.update(status="incomplete", failed_stage=None, reason="not run yet, or its outputs are gone")
    else:
        row.update(status="ok", failed_stage=None, reason=None)
    if train is not None:
        details = train["details"]
        for key in ("steps", "first_val_loss", "best_val_loss", "tokens_per_second", "train_seconds", "peak_memory_gb"):
            row[key] = details.get(key)
        row["adapter_sha256"] = next((o["sha256"] for o in train["outputs"] if o["role"] == "adapter"), None)
    if metrics is not None:
        row.update(eval_columns(name, metrics, policy))
    contracts.validate(row, "experiment_row", where=f"{paths.display(paths.EXPERIMENTS_CSV)} ({name})")
    return row


def eval_columns(name: str, metrics: dict, policy: dict) -> dict:
    task = metrics["task_metric"]
    verdict = metrics.get("verdict") or {}
    out = {"task_metric": task, "base_task": verdict.get("base"), "fused_task": verdict.get("tuned")}
    out.update(verdict=verdict.get("answer"), interval_low=verdict.get("low"), interval_high=verdict.get("high"))
    for artifact in metrics["artifacts"]:
        if artifact["status"] != "ok":
            continue
        label = artifact_label(name, artifact["id"])
        out[f"loss:{label}"] = artifact["loss"]
        value = (artifact.get("metrics") or {}).get(task, {}).get("value") if task != "loss" else artifact["loss"]
        if value is not None:
            out[f"{task}:{label}"] = value
    ship = policy.get("ship")
    out.update(ship=ship and artifact_label(name, ship["id"]), ship_bytes=ship and ship["bytes"])
    return out


def artifact_label(experiment: str, artifact_id: str) -> str:
    """main/main-Q4_K_M.gguf -> Q4_K_M.gguf; main/fused -> fused; base -> base."""
    return artifact_id.split("/")[-1].removeprefix(f"{experiment}-")


def first_failure(cfg) -> dict | None:
    """The earliest stage of the pipeline whose failure record stands, for this experiment."""
    return cli.first_failure(cfg, [s for s in stages.PIPELINE if s in EXPERIMENT_STAGES])


def _manifest(stage_name: str, experiment: str) -> dict | None:
    path = stages.get(stage_name).manifest_path(experiment)
    return contracts.read_json(path, "run_manifest") if path.is_file() else None


def _eval_outputs(experiment: str) -> tuple[dict | None, dict | None]:
    if _manifest("eval", experiment) is None:
        return None, None
    folder = paths.eval_dir(experiment)
    return (
        contracts.read_json(folder / "metrics.json", "eval_metrics"),
        contracts.read_json(folder / "generation_policy.json", "generation_policy"),
    )


def _value(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node if not hasattr(node, "items") else dict(node)


def write_csv(out: Path, rows: list[dict], varied: list[str]) -> None:
    extra = sorted({k for r in rows for k in r if ":" in k}, key=lambda k: (k.split(":")[1], k))
    columns = ["schema_version", "experiment", *varied, *FIXED_COLUMNS[2:], *extra]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    contracts.write_bytes_atomic(out, buffer.getvalue().encode("utf-8"))


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return orjson.dumps(value).decode()
    return value


# --- the summary ------------------------------------------------------------------------------------


def ranked(rows: list[dict]) -> list[dict]:
    """Finished experiments best first by the fine-tuned model's task metric (ties: smaller ship, then
    faster training), then the others."""

    def key(row):
        if row["status"] != "ok" or row.get("fused_task") is None:
            return (1, 0.0, 0, 0.0, row["experiment"])
        value = row["fused_task"] if row["task_metric"] not in LOWER_IS_BETTER else -row["fused_task"]
        return (0, -value, row.get("ship_bytes") or 0, row.get("train_seconds") or 0.0, row["experiment"])

    return sorted(rows, key=key)


def seed_groups(rows: list[dict], varied: list[str]) -> list[dict]:
    """Experiments that differ only in their seed, with the mean and standard deviation of the fine-tuned
    model's task metric over their seeds (sd: sample standard deviation; 0 for one seed)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "ok" and row.get("fused_task") is not None:
            groups.setdefault(tuple(format_value(row.get(k)) for k in varied), []).append(row)
    out = []
    for settings, members in groups.items():
        values = [m["fused_task"] for m in members]
        out.append(
            {
                "settings": dict(zip(varied, settings)),
                "seeds": sorted(m["seed"] for m in members),
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "task_metric": members[0]["task_metric"],
                "train_seconds": statistics.fmean(m.get("train_seconds") or 0.0 for m in members),
            }
        )
    return out


def summary_markdown(
    rows: list[dict], varied: list[str], charts: list[tuple[str, str]], search_line: str | None = None
) -> str:
    order = ranked(rows)
    lines = ["# Experiments", ""]
    best = order[0] if order and order[0]["status"] == "ok" else None
    if best:
        lines += [_best_line(best), ""]
    if search_line:
        lines += [search_line, ""]
    done = sum(r["status"] == "ok" for r in rows)
    lines += [
        f"{len(rows)} experiments, {done} complete. Ranked by the fine-tuned (fused) model's task metric on the "
        "test split (ties: the smaller shipped artifact, then the shorter training). From "
        f"`{paths.display(paths.EXPERIMENTS_CSV)}`.",
        "",
    ]
    header = ["#", "experiment", *varied, "status", "train s", "tok/s", "best val loss", "task metric", "base",
              "fine-tuned", "Δ (95% interval)", "ships", "size"]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(order, 1):
        lines.append("| " + " | ".join(_row_cells(rank, row, varied)) + " |")
    groups = seed_groups(rows, varied)
    if any(len(g["seeds"]) > 1 for g in groups):
        lines += [
            "",
            "## Over seeds",
            "",
            "| " + " | ".join([*varied, "seeds", "fine-tuned mean ± sd", "train s"]) + " |",
        ]
        lines.append("|" + "---|" * (len(varied) + 3))
        for g in sorted(groups, key=lambda g: -g["mean"] if g["task_metric"] not in LOWER_IS_BETTER else g["mean"]):
            digits = 3 if g["task_metric"] in LOWER_IS_BETTER else 1
            cells = [*g["settings"].values(), f"{len(g['seeds'])} ({', '.join(map(str, g['seeds']))})"]
            cells += [f"{g['mean']:.{digits}f} ± {g['sd']:.{digits}f}", f"{g['train_seconds']:.0f}"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "## Not complete", ""]
        lines += [f"- `{r['experiment']}`: {r['failed_stage'] or 'not run'}: {r['reason']}" for r in failed]
    lines += [""] + [f"![{title}]({CHART_DIR}/{name})" for name, title in charts]
    return "\n".join(lines) + "\n"


def _best_line(row: dict) -> str:
    digits = 3 if row["task_metric"] in LOWER_IS_BETTER else 1
    ship = f"ships `{row['ship']}` ({_size(row['ship_bytes'])})" if row.get("ship") else "ships nothing"
    return (
        f"**Best: `{row['experiment']}`**: {row['task_metric']} {row['fused_task']:.{digits}f} fine-tuned "
        f"(base {row['base_task']:.{digits}f}); {ship}; trained in {row.get('train_seconds') or 0:.0f} s."
    )


def _row_cells(rank: int, row: dict, varied: list[str]) -> list[str]:
    settings = [format_value(row.get(k)) for k in varied]
    if row["status"] != "ok":
        return [str(rank), row["experiment"], *settings, f"{row['status']} ({row['failed_stage'] or '–'})"] + ["–"] * 9
    digits = 3 if row["task_metric"] in LOWER_IS_BETTER else 1
    delta = "–"
    if row.get("fused_task") is not None and row.get("base_task") is not None:
        delta = f"{row['fused_task'] - row['base_task']:+.{digits}f}"
        if row.get("interval_low") is not None:
            delta += f" ({row['interval_low']:+.{digits}f} to {row['interval_high']:+.{digits}f})"
    return [
        str(rank),
        row["experiment"],
        *settings,
        f"ok ({row.get('verdict') or '–'})",
        _fmt(row.get("train_seconds"), 0),
        _fmt(row.get("tokens_per_second"), 1),
        _fmt(row.get("best_val_loss"), 3),
        row["task_metric"],
        _fmt(row.get("base_task"), digits),
        _fmt(row.get("fused_task"), digits),
        delta,
        f"`{row['ship']}`" if row.get("ship") else "nothing",
        _size(row.get("ship_bytes")),
    ]


def _fmt(value, digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _size(size) -> str:
    if not size:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1000
    return f"{size:.1f} GB"


STYLE = """
body { font: 15px/1.45 -apple-system, system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; } th, td { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; } td { text-align: right; } td:nth-child(2) { text-align: left; }
img { max-width: 48%; margin: 0.5em 1%; } code { background: #f3f3f3; padding: 0 3px; }
"""


def summary_html(markdown: str, chart_dir: Path) -> str:
    """The summary as one self-contained page: the same Markdown rendered, its charts inlined."""
    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def inline(match: re.Match) -> str:
        data = base64.b64encode((chart_dir / match[1]).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(rf'src="{CHART_DIR}/([^"/]+\.png)"', inline, body)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Experiments</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n"
    )


# --- charts -----------------------------------------------------------------------------------------


def write_charts(folder: Path, rows: list[dict], varied: list[str]) -> list[tuple[str, str]]:
    """One chart per varied setting: the fine-tuned model's task metric against it (each seed a point),
    the base model as a dashed line; with nothing varied, one bar per experiment."""
    done = [r for r in rows if r["status"] == "ok" and r.get("fused_task") is not None]
    if not done:
        return []
    task = done[0]["task_metric"]
    charts = []
    for key in varied or [None]:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        if key is None:
            ax.bar([r["experiment"] for r in done], [r["fused_task"] for r in done], color="#4c72b0")
            name = "task_metric_by_experiment.png"
        else:
            labels = list(dict.fromkeys(format_value(r.get(key)) for r in done))
            xs = [labels.index(format_value(r.get(key))) for r in done]
            ax.scatter(xs, [r["fused_task"] for r in done], color="#4c72b0", zorder=3, label="fine-tuned")
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel(key)
            name = f"{task}_vs_{key.replace('.', '_')}.png"
        base = next((r["base_task"] for r in done if r.get("base_task") is not None), None)
        if base is not None:
            ax.axhline(base, color="#888", linestyle="--", label="base model")
            ax.legend(loc="best")
        ax.set_ylabel(task)
        ax.set_title(f"{task} of the fine-tuned model" + (f" by {key}" if key else ""))
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        charts.append((name, f"{task} vs {key}" if key else f"{task} by experiment"))
    return charts


if __name__ == "__main__":
    sys.exit(main())
