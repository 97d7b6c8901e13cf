"""prepare stage: any dataset in; validated train/valid/test JSONL out, with contract, catalog and report.

Reads config sections `data` and `prepare`, and runs/model.manifest.json (schema run_manifest) for
the tokenizer and chat template. Writes data/train.jsonl, data/valid.jsonl, data/test.jsonl (records
mlx-lm reads: text, prompt/completion, or messages), data/data_contract.json (schema data_contract),
data/data_catalog.json (data_catalog), data/data_report.json (data_report) with data/data_report.md,
data/tool_schemas.json when the data declares tools, and last data/prepare.manifest.json
(run_manifest). Everything is staged first: a failed run leaves the previous data/ as it was.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import cli, config, contracts, hashing, paths, stages
from pipeline.errors import PipelineError
from pipeline.manifest import StageRun, file_entry, output_entry, output_path
from pipeline.paths import SPLITS
from pipeline.splits import removed_summary
from pipeline.staging import staging_folder

import numpy as np
import orjson
from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

from lm import chat_template, tokens
from prepare import quality, toolcalls
from prepare import records as records_mod
from prepare import sources as sources_mod

log = logging.getLogger("prepare")


def build_parser():
    return cli.stage_parser("prepare", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("prepare", args, run)


def run(cfg) -> dict:
    stage = StageRun("prepare", {"data": config.section(cfg, "data"), "prepare": config.section(cfg, "prepare")})
    model_manifest = stages.read_manifest("model")
    tokenizer = load_tokenizer(output_path(model_manifest, "model"))
    template = chat_template.resolve_template(cfg.prepare.template, getattr(tokenizer, "chat_template", None))
    skipped: list[dict] = []  # malformed lines dropped under prepare.on_error=skip, for the report
    sources = [sources_mod.read_source(s, cfg, tokenizer, skipped) for s in sources_mod.source_list(cfg.data.source)]
    kind = records_mod.output_kind(s["kind"] for s in sources)
    render_as_text = kind != "text" and template["origin"] != "model" and not getattr(tokenizer, "chat_template", None)
    special = chat_template.special_tokens(tokenizer)
    tool_schemas = collect_tool_schemas(sources)
    tools_report = fit_to_template(sources, chat_template.template_features(template, special))
    splits = assign_splits(sources, cfg)
    cleaned, report = clean_splits(splits, kind, template, special, tokenizer, cfg, record_origins(sources))
    check_split_sizes(cleaned, report, cfg)
    report["skipped_lines"] = skipped
    report["tools"] = tools_report
    if render_as_text:
        cleaned = {name: [render_text(r, kind, template, special) for r in recs] for name, recs in cleaned.items()}
        kind = "text"
    outputs = write_outputs(stage, cfg, cleaned, kind, template, sources, report, tool_schemas, model_manifest)
    log.info("prepared %s: %s", kind, ", ".join(f"{n} {len(cleaned[n])}" for n in SPLITS))
    return outputs


# --- splits ------------------------------------------------------------------------------------


def assign_splits(sources: list[dict], cfg) -> dict[str, list[tuple[dict, dict]]]:
    """{split: [(record, raw-ish origin)]}: given splits kept, the rest shuffled with data.seed and cut by ratio."""
    ratios = {name: float(cfg.data.splits[name]) for name in SPLITS}
    if any(r < 0 for r in ratios.values()) or sum(ratios.values()) <= 0:
        raise PipelineError(
            "split ratios must be >= 0 and not all 0",
            where="data.splits",
            fix="e.g. {train: 0.8, valid: 0.1, test: 0.1}",
        )
    given: dict[str, list[dict]] = {name: [] for name in SPLITS}
    pooled: list[dict] = []
    for source in sources:
        for split, recs in source["splits"].items():
            (given[split] if split else pooled).extend(recs)
    rng = random.Random(cfg.data.seed)
    rng.shuffle(pooled)
    missing = [name for name in SPLITS if not given[name]]
    if pooled or missing:
        if not pooled and given["train"]:
            pooled, given["train"] = given["train"], []
            missing = [name for name in SPLITS if not given[name]]
        total = sum(ratios[name] for name in missing) or 1.0
        start = 0
        for i, name in enumerate(missing):
            end = len(pooled) if i == len(missing) - 1 else start + round(len(pooled) * ratios[name] / total)
            given[name].extend(pooled[start:end])
            start = end
    for name in SPLITS:
        if not given[name] and ratios[name] > 0:
            counts = ", ".join(f"{len(given[n])} {n}" for n in SPLITS)
            raise PipelineError(
                f"the {name} split is empty: the {sum(len(v) for v in given.values())} records split into {counts}",
                where="data.source",
                fix=f"add records (train needs at least one batch; valid and test a few each), or give a {name} file",
            )
    return given


def check_split_sizes(cleaned: dict, report: dict, cfg) -> None:
    """A split that cleaning emptied is an error saying what removed its records (train needs records to
    learn from, valid for its loss and early stopping, test for eval)."""
    for name in SPLITS:
        if cleaned[name] or float(cfg.data.splits[name]) == 0:
            continue
        raise PipelineError(
            f"the {name} split has no records left: {removed_summary(report, name)}",
            where="data.source",
            fix="add more distinct records, or loosen what removed them (data.max_seq_length, prepare.dedupe, "
            "prepare.decontaminate)",
        )


# --- cleaning ----------------------------------------------------------------------------------


def training_text(record: dict, kind: str, template: dict, special: dict) -> str:
    if kind == "text":
        return record["text"]
    messages = record["messages"] if kind == "messages" else records_mod.completions_to_messages(record)["messages"]
    return chat_template.render_chat(template, messages, special, tools=record.get("tools"))


def render_text(record: dict, kind: str, template: dict, special: dict) -> dict:
    return {"text": training_text(record, kind, template, special)}


def record_origins(sources: list[dict]) -> dict[int, str]:
    """id(record) -> where it came from ("data/x.jsonl:12"), for errors about one record."""
    return {
        id(r): where
        for source in sources
        for recs in source["splits"].values()
        for r, where in zip(recs, records_mod.origins_of(recs))
    }


def clean_splits(splits, kind, template, special, tokenizer, cfg, origins: dict[int, str]) -> tuple[dict, dict]:
    report = {"splits": {}}
    cleaned = {}
    for name in SPLITS:
        recs = []
        for r in splits[name]:
            recs.append(records_mod.completions_to_messages(r) if kind == "messages" and "prompt" in r else r)
            origins.setdefault(id(recs[-1]), origins.get(id(r), ""))
        cleaned[name], report["splits"][name] = clean_one_split(
            name, recs, kind, template, special, tokenizer, cfg, origins
        )
    report["contamination"] = decontaminate(cleaned, cfg)
    for name in SPLITS:
        report["splits"][name]["records_out"] = len(cleaned[name])
    return cleaned, report


def clean_one_split(name, recs, kind, template, special, tokenizer, cfg, origins) -> tuple[list[dict], dict]:
    stats = {"records_in": len(recs)}
    empty = [i for i, r in enumerate(recs) if quality.is_empty(r)]
    recs = [r for i, r in enumerate(recs) if i not in set(empty)]
    stats["empty_removed"] = len(empty)
    texts = [quality.record_text(r) for r in recs]
    if cfg.prepare.dedupe:
        kept, exact, normal = quality.dedupe(texts)
        recs, texts = [recs[i] for i in kept], [texts[i] for i in kept]
    else:
        exact = normal = 0
    stats["duplicates_removed"] = {"exact": exact, "normalized": normal}
    stats["control_characters"] = quality.count_matching(texts, quality.CONTROL_CHARS)
    recs, stats["secrets"] = handle_secrets(name, recs, texts, cfg.prepare.secrets, origins)
    rendered = [training_text(r, kind, template, special) for r in recs]
    if kind == "messages":  # one tokenization gives the lengths and the offsets the mask check reads
        encoded = tokens.encode_with_offsets(tokenizer, rendered)
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        notes = mask_notes(recs, rendered, encoded, template, special)
    else:
        lengths, notes = quality.token_lengths(tokenizer, rendered), {}
    recs, lengths, stats["too_long"] = handle_too_long(name, recs, lengths, kind, tokenizer, cfg, origins)
    stats["tokens"] = quality.length_stats(lengths)
    stats["last_turn_only"] = count_last_turn_only(name, recs, notes, origins)
    stats["field_presence"] = quality.field_presence([quality.present_fields(r) for r in recs])
    return recs, stats


def handle_secrets(split: str, recs: list[dict], texts: list[str], policy: str, origins) -> tuple[list[dict], dict]:
    found = quality.find_secrets(texts)
    findings = [
        {"split": split, "record": i + 1, "type": f["type"], "line": f["line"]}
        for i, fs in sorted(found.items())
        for f in fs
    ]
    if found and policy == "fail":
        first = findings[0]
        where = origins.get(id(recs[first["record"] - 1])) or f"data {split} record {first['record']}"
        raise PipelineError(
            f"{len(found)} record(s) hold secrets, first: {first['type']} (line {first['line']} of the record's text)",
            where=where,
            fix="remove them from the source, or set prepare.secrets=redact (replace them) or warn (keep them)",
        )
    if found and policy == "redact":
        recs = [quality.redact(r, [f["value"] for f in found[i]]) if i in found else r for i, r in enumerate(recs)]
    if found:
        log.warning(
            "%s: %d record(s) hold secrets (%s)",
            split,
            len(found),
            "redacted" if policy == "redact" else "kept: prepare.secrets=warn",
        )
    return recs, {"records": len(found), "policy": policy, "findings": findings[:100]}


def handle_too_long(split, recs, lengths, kind, tokenizer, cfg, origins):
    limit = cfg.data.max_seq_length
    over = [i for i, n in enumerate(lengths) if n > limit]
    stats = {"limit": limit, "records": len(over), "policy": cfg.prepare.too_long}
    if not over:
        return recs, lengths, stats
    if cfg.prepare.too_long == "fail":
        raise PipelineError(
            f"{len(over)} {split} record(s) are longer than data.max_seq_length={limit} tokens (this one: "
            f"{int(lengths[over[0]])} tokens)",
            where=origins.get(id(recs[over[0]])) or f"data {split} record {over[0] + 1}",
            fix="raise data.max_seq_length, or set prepare.too_long=drop or truncate",
        )
    if cfg.prepare.too_long == "drop":
        keep = [i for i in range(len(recs)) if lengths[i] <= limit]
        return [recs[i] for i in keep], lengths[keep], stats
    if kind == "text":
        recs = [truncate_text(r, tokenizer, limit) if lengths[i] > limit else r for i, r in enumerate(recs)]
        lengths = lengths.clip(max=limit)
    else:
        stats["note"] = "chat records are cut to max_seq_length by the trainer"
    return recs, lengths, stats


def mask_notes(recs, rendered, encoded, template, special) -> dict[int, str]:
    """{id(record): why} for the chats whose assistant turns cannot all be masked apart with this template
    (lm.tokens.spans_in: the same check train makes); train learns only their last turn."""
    notes = {}
    for record, whole, encoding in zip(recs, rendered, encoded):
        texts = tokens.turn_texts(template, record["messages"], record.get("tools"), special, whole=whole)
        note = tokens.spans_in(texts, encoding)[2]
        if note:
            notes[id(record)] = note
    return notes


def count_last_turn_only(split, recs, notes: dict[int, str], origins) -> int:
    """How many kept records train on their last turn only; the first is named in one warning."""
    broken = [r for r in recs if id(r) in notes]
    if broken:
        where = origins.get(id(broken[0])) or f"data {split}"
        log.warning(
            "%s: %d record(s) train on their last assistant turn only; first: %s: %s",
            split,
            len(broken),
            where,
            notes[id(broken[0])],
        )
    return len(broken)


def truncate_text(record: dict, tokenizer, limit: int) -> dict:
    return {"text": tokenizer.decode(tokenizer.encode(record["text"])[:limit])}


def decontaminate(cleaned: dict, cfg) -> dict:
    keys = {name: [quality.normalized_key(quality.prompt_side_text(r)) for r in cleaned[name]] for name in SPLITS}
    result = {
        name: quality.contamination(keys["train"], keys[name], cfg.prepare.contamination_ngram)
        for name in ("valid", "test")
    }
    removed = 0
    if cfg.prepare.decontaminate:
        held_out = set(keys["valid"]) | set(keys["test"])
        keep = [r for r, k in zip(cleaned["train"], keys["train"]) if k not in held_out]
        removed = len(cleaned["train"]) - len(keep)
        cleaned["train"] = keep
    result["train_records_removed"] = removed
    return result


def collect_tool_schemas(sources: list[dict]) -> dict | None:
    """{tool name: parameters schema} from the builtin dataset and every record's tool definitions."""
    schemas = {}
    for source in sources:
        schemas.update(source["tool_schemas"] or {})
        for recs in source["splits"].values():
            for name, schema in toolcalls.tool_schemas(recs).items():
                schemas.setdefault(name, schema)
    return schemas or None


def fit_to_template(sources: list[dict], features: dict) -> dict:
    """Every record rewritten so the chat template shows its tools, calls and results
    (prepare.toolcalls.fit_template); what the template shows and how many records had parts moved."""
    moved = {"tools": 0, "tool_calls": 0, "tool_results": 0}
    for source in sources:
        for split, recs in source["splits"].items():
            fitted = []
            for record in recs:
                record, parts = toolcalls.fit_template(record, features)
                fitted.append(record)
                for part in parts:
                    moved[part] += 1
            source["splits"][split] = records_mod.Located(fitted, records_mod.origins_of(recs))
    for part, count in moved.items():
        if count:
            log.info(
                "%d record(s): the chat template does not show %s, so %s", count, part.replace("_", " "), MOVED[part]
            )
    return {"template_shows": features, "records_moved": moved}


MOVED = {
    "tools": "their tool definitions are in the system prompt",
    "tool_calls": "their tool calls are JSON lines in the assistant text",
    "tool_results": "their tool results are user turns",
}


# --- outputs -----------------------------------------------------------------------------------


def write_outputs(stage, cfg, cleaned, kind, template, sources, report, tool_schemas, model_manifest) -> dict:
    staging = staging_folder(paths.DATA_DIR, "prepare", stage.staging.key)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    final = stage_files(staging, cfg, cleaned, kind, template, sources, report, tool_schemas, model_manifest)
    for name in final:
        stage.staged(paths.DATA_DIR / name, keep=True)  # written above; finish swaps it in
    inputs = [file_entry("model", paths.MODEL_MANIFEST)] + [
        {"role": "source", "path": s["path"], "sha256": s["sha256"], "bytes": s["bytes"]} for s in sources
    ]
    outputs = [stage.entry(name.split(".")[0], paths.DATA_DIR / name) for name in final]
    stage.finish(
        paths.PREPARE_MANIFEST, inputs, outputs, {"format": kind, "records": {n: len(cleaned[n]) for n in SPLITS}}
    )
    return {name: paths.DATA_DIR / name for name in final}


def stage_files(staging, cfg, cleaned, kind, template, sources, report, tool_schemas, model_manifest) -> list[str]:
    names = []
    catalog = {"format": kind, "splits": {}}
    for split in SPLITS:
        path = staging / f"{split}.jsonl"
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in cleaned[split]))
        catalog["splits"][split] = {
            "path": paths.display(paths.split_file(split)),
            "records": len(cleaned[split]),
            "bytes": path.stat().st_size,
            "sha256": hashing.sha256_file(path),
            "tokens": report["splits"][split]["tokens"]["total"],
        }
        names.append(path.name)
    if tool_schemas:
        (staging / "tool_schemas.json").write_bytes(orjson.dumps(tool_schemas, option=orjson.OPT_INDENT_2))
        names.append("tool_schemas.json")
    contract = data_contract(cfg, kind, template, sources, tool_schemas, model_manifest)
    contracts.write_json(staging / "data_contract.json", contract, "data_contract")
    contracts.write_json(staging / "data_catalog.json", catalog, "data_catalog")
    source_fields = [
        {"path": s["path"], "format": s["format"], "records": len(s["raw"]), "field_presence": s["field_presence"]}
        for s in sources
    ]
    full_report = {"format": kind, "template": template["id"], "sources": source_fields, **report}
    contracts.write_json(staging / "data_report.json", full_report, "data_report")
    (staging / "data_report.md").write_text(report_markdown(full_report, catalog), encoding="utf-8")
    return names + ["data_contract.json", "data_catalog.json", "data_report.json", "data_report.md"]


RECORD_SCHEMAS = {
    "text": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
    "completions": {
        "type": "object",
        "required": ["prompt", "completion"],
        "properties": {"prompt": {"type": "string"}, "completion": {"type": "string"}},
    },
    "messages": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "messages": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {"role": {"enum": list(records_mod.ROLES)}, "content": {"type": "string"}},
                },
            },
            "tools": {"type": "array"},
        },
    },
}


def data_contract(cfg, kind, template, sources, tool_schemas, model_manifest) -> dict:
    return {
        "format": kind,
        "record_schema": RECORD_SCHEMAS[kind],
        "field_map": dict(cfg.data.field_map),
        "template": {
            "id": template["id"],
            "origin": template["origin"],
            "source": template["source"],
            "sha256": hashing.sha256_json(template["source"]),
        },
        "max_seq_length": cfg.data.max_seq_length,
        "sources": [
            {
                "source": s["source"],
                "path": s["path"],
                "sha256": s["sha256"],
                "bytes": s["bytes"],
                "format": s["format"],
                "records": len(s["raw"]),
                **({"files": s["files"]} if s.get("files") else {}),
            }
            for s in sources
        ],
        "splits": {name: paths.display(paths.split_file(name)) for name in SPLITS},
        "tool_schemas": paths.display(paths.DATA_DIR / "tool_schemas.json") if tool_schemas else None,
        "tokenizer": {
            "model": output_path(model_manifest, "model").name,
            "sha256": output_entry(model_manifest, "model")["sha256"],
        },
        "config": {"data": config.section(cfg, "data"), "prepare": config.section(cfg, "prepare")},
    }


def report_markdown(report: dict, catalog: dict) -> str:
    rows = ["| | " + " | ".join(SPLITS) + " |", "|---|" + "---|" * len(SPLITS)]

    def row(label, get):
        rows.append(f"| {label} | " + " | ".join(str(get(report["splits"][s])) for s in SPLITS) + " |")

    row("records in", lambda s: s["records_in"])
    row("records out", lambda s: s["records_out"])
    row("empty removed", lambda s: s["empty_removed"])
    row("exact duplicates removed", lambda s: s["duplicates_removed"]["exact"])
    row("normalized duplicates removed", lambda s: s["duplicates_removed"]["normalized"])
    row(
        f"longer than {report['splits']['train']['too_long']['limit']} tokens",
        lambda s: f"{s['too_long']['records']} ({s['too_long']['policy']})",
    )
    row("records with secrets", lambda s: s["secrets"]["records"])
    row("chats trained on the last turn only", lambda s: s["last_turn_only"])
    row("records with control characters", lambda s: s["control_characters"])
    for stat in ("min", "median", "p95", "max", "total"):
        row(f"tokens {stat}", lambda s, stat=stat: s["tokens"][stat])
    contamination = report["contamination"]
    lines = [
        "# Data report",
        "",
        f"Format **{report['format']}**, template **{report['template']}**. Token counts use the base model's "
        f"tokenizer.",
        "",
        *rows,
        "",
        "## Contamination (train vs held-out)",
        "",
        "| split | records | same as a train record | share a word {n}-gram with train |".format(
            n=contamination["valid"]["ngram_n"]
        ),
        "|---|---|---|---|",
        *[
            f"| {s} | {contamination[s]['records']} | {contamination[s]['exact']} | {contamination[s]['ngram']} |"
            for s in ("valid", "test")
        ],
        "",
        f"Train records removed because they equal a held-out record: {contamination['train_records_removed']}.",
    ]
    lines += [
        "",
        "## Sources",
        "",
        "| source | format | records | fields present (share of records) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {s['path']} | {s['format']} | {s['records']} | "
        + ", ".join(f"{k} {v:.0%}" for k, v in s["field_presence"].items())
        + " |"
        for s in report["sources"]
    ]
    lines += tools_markdown(report["tools"])
    if report["skipped_lines"]:
        lines += ["", f"## Skipped malformed lines ({len(report['skipped_lines'])})", ""]
        lines += [f"- `{s['where']}`: {s['error']}" for s in report["skipped_lines"][:50]]
    secrets = [f for s in SPLITS for f in report["splits"][s]["secrets"]["findings"]]
    if secrets:
        lines += ["", "## Secrets found", ""] + [
            f"- {f['split']} record {f['record']}, line {f['line']}: {f['type']}" for f in secrets[:50]
        ]
    return "\n".join(lines) + "\n"


def tools_markdown(tools: dict) -> list[str]:
    moved = {part: n for part, n in tools["records_moved"].items() if n}
    if not moved:
        return []
    lines = ["", "## Tools and the chat template", ""]
    lines += [
        f"- {n} record(s): the template does not show {part.replace('_', ' ')}, so {MOVED[part]}."
        for part, n in moved.items()
    ]
    return lines + [f"- Format: `{toolcalls.TOOLS_PREAMBLE.splitlines()[0]}` then one JSON line per tool."]


def load_tokenizer(model_dir: Path):
    return mlx_load_tokenizer(model_dir)
