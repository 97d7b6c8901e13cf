"""prepare stage: any dataset in; validated train/valid/test JSONL out, with contract, catalog and report.

Reads config sections `data` and `prepare`, and runs/model.manifest.json (schema run_manifest) for
the tokenizer and chat template. Writes data/train.jsonl, data/valid.jsonl, data/test.jsonl (records
mlx-lm reads: text, prompt/completion, or messages), data/data_contract.json (schema data_contract),
data/data_catalog.json (data_catalog), data/data_report.json (data_report) with data/data_report.md,
data/tool_schemas.json when the data declares tools, and last data/prepare.manifest.json
(run_manifest). Everything is staged first: a failed run leaves the previous data/ as it was.
"""

from __future__ import annotations

import io
import logging
import random
import re
import shutil
import sys
from pathlib import Path

import orjson

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
import prepare_quality as quality
import prepare_records as records_mod
from pipeline import cli, config, contracts, hashing, paths
from pipeline.errors import PipelineError
from pipeline.manifest import StageRun, file_entry, output_path

log = logging.getLogger("prepare")

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid", "test": "test", "testing": "test"}
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
DOCUMENT_SUFFIXES = (".txt", ".md")
BUILTIN_DATASETS = ("tool-calls",)


def build_parser():
    return cli.stage_parser("prepare", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("prepare", args, run, sections=("data", "prepare"))


def run(cfg) -> dict:
    stage = StageRun("prepare", {"data": config.section(cfg, "data"), "prepare": config.section(cfg, "prepare")})
    model_manifest = contracts.read_json(paths.MODEL_MANIFEST, "run_manifest")
    tokenizer = load_tokenizer(output_path(model_manifest, "model"))
    template = records_mod.resolve_template(cfg.prepare.template, getattr(tokenizer, "chat_template", None))
    skipped: list[dict] = []  # malformed lines dropped under prepare.on_error=skip, for the report
    sources = [read_source(s, cfg, tokenizer, skipped) for s in source_list(cfg.data.source)]
    kind = records_mod.output_kind(s["kind"] for s in sources)
    render_as_text = kind != "text" and template["origin"] != "model" and not getattr(tokenizer, "chat_template", None)
    splits = assign_splits(sources, cfg)
    special = special_tokens(tokenizer)
    cleaned, report = clean_splits(splits, kind, template, special, tokenizer, cfg)
    report["skipped_lines"] = skipped
    if render_as_text:
        cleaned = {name: [render_text(r, kind, template, special) for r in recs] for name, recs in cleaned.items()}
        kind = "text"
    tool_schemas = collect_tool_schemas(sources)
    outputs = write_outputs(stage, cfg, cleaned, kind, template, sources, report, tool_schemas, model_manifest)
    log.info("prepared %s: %s", kind, ", ".join(f"{n} {len(cleaned[n])}" for n in SPLITS))
    return outputs


# --- sources -----------------------------------------------------------------------------------


def source_list(source) -> list[str]:
    items = [source] if isinstance(source, str) else list(source)
    if not items:
        raise PipelineError("no data source given", where="data.source", fix="set data.source to a file, a folder or builtin:tool-calls")
    return [str(s) for s in items]


def read_source(source: str, cfg, tokenizer, skipped: list) -> dict:
    """{"source", "path", "sha256", "bytes", "format", "kind", "splits": {split|None: records}, "raw": [...]}."""
    if source.startswith("builtin:"):
        return builtin_source(source.removeprefix("builtin:"), cfg)
    path = paths.resolve(source)
    if path.is_file():
        raw = {split_of(path): read_file(path, cfg, tokenizer, skipped)}
        info = {"path": paths.display(path), "sha256": hashing.sha256_file(path), "bytes": path.stat().st_size}
    elif path.is_dir():
        raw = read_folder(path, cfg, tokenizer, skipped)
        info = {"path": paths.display(path), "sha256": hashing.sha256_tree(path), "bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file())}
    elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) and not source.startswith("."):
        raw = read_hub_dataset(source)
        info = {"path": f"hub:{source}", "sha256": hashing.sha256_json({"hub": source}), "bytes": 0}
    else:
        raise PipelineError(f"data source '{source}' does not exist", where="data.source", fix="give an existing file or folder, builtin:tool-calls, or a hub dataset id")
    return normalize_source(source, info, raw, cfg)


def normalize_source(source: str, info: dict, raw: dict, cfg) -> dict:
    field_map = dict(cfg.data.field_map)
    mapped = {split: records_mod.apply_field_map(recs, field_map) for split, recs in raw.items()}
    every = [r for recs in mapped.values() for r in recs]
    if not every:
        raise PipelineError("the source holds no records", where=info["path"], fix="check the path, or the file's content")
    fmt = cfg.data.format if cfg.data.format != "auto" else records_mod.detect_format(every, info["path"])
    if fmt not in records_mod.INPUT_FORMATS:
        raise PipelineError(f"unknown data.format '{fmt}'", where="data.format", fix="use auto, " + ", ".join(records_mod.INPUT_FORMATS))
    splits, kind = {}, None
    for split, recs in mapped.items():
        kind, splits[split] = records_mod.normalize(recs, fmt, info["path"]) if recs else (kind, [])
    kind = kind or {"text": "text", "completions": "completions"}.get(fmt, "messages")
    log.info("read %s: %d records, format %s", info["path"], len(every), fmt)
    presence = quality.field_presence(every)
    return {"source": source, **info, "format": fmt, "kind": kind, "splits": splits, "raw": every, "field_presence": presence, "tool_schemas": None}


def builtin_source(name: str, cfg) -> dict:
    if name not in BUILTIN_DATASETS:
        raise PipelineError(f"no builtin dataset named '{name}'", where="data.source", fix="builtin datasets: " + ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS))
    import toolcalls_dataset

    splits = toolcalls_dataset.generate(seed=cfg.data.seed)
    info = {"path": f"builtin:{name}", "sha256": hashing.sha256_json(splits), "bytes": len(orjson.dumps(splits))}
    source = normalize_source(f"builtin:{name}", info, splits, cfg)
    source["tool_schemas"] = toolcalls_dataset.tool_schemas()
    return source


def split_of(path: Path) -> str | None:
    """The split a file's name says it is (train.jsonl, validation.csv ...), or None."""
    stem = path.name.split(".")[0].lower()
    return SPLIT_ALIASES.get(stem)


def read_folder(folder: Path, cfg, tokenizer, skipped: list) -> dict:
    if (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file():
        return read_saved_hf_dataset(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES + DOCUMENT_SUFFIXES)
    if not files:
        raise PipelineError("no data files in the folder", where=paths.display(folder), fix="supported: " + " ".join(TABLE_SUFFIXES + DOCUMENT_SUFFIXES))
    grouped: dict = {}
    for path in files:
        grouped.setdefault(split_of(path), []).extend(read_file(path, cfg, tokenizer, skipped))
    return grouped


def read_file(path: Path, cfg, tokenizer, skipped: list) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return read_parquet(path)
    text = read_utf8(path)
    if suffix == ".jsonl":
        return read_jsonl(text, path, cfg.prepare.on_error, skipped)
    if suffix == ".json":
        return read_json_array(text, path)
    if suffix in (".csv", ".tsv"):
        return read_delimited(text, path, "\t" if suffix == ".tsv" else ",")
    if suffix in DOCUMENT_SUFFIXES:
        return [{"text": chunk} for chunk in chunk_document(text, tokenizer, cfg.prepare.chunk_tokens)]
    raise PipelineError(f"unsupported file type {suffix}", where=paths.display(path), fix="supported: " + " ".join(TABLE_SUFFIXES + DOCUMENT_SUFFIXES))


def read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PipelineError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            where=f"{paths.display(path)}:{line}",
            fix="re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`",
        ) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def read_jsonl(text: str, path: Path, on_error: str, skipped: list) -> list[dict]:
    out = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except (orjson.JSONDecodeError, ValueError) as exc:
            if on_error == "skip":
                skipped.append({"where": f"{paths.display(path)}:{line_no}", "error": str(exc).splitlines()[0]})
                continue
            raise PipelineError(
                f"malformed JSON line ({str(exc).splitlines()[0]}): {line[:120]!r}",
                where=f"{paths.display(path)}:{line_no}",
                fix="fix that line, or set prepare.on_error=skip to drop bad lines (they are counted in the report)",
            ) from None
        out.append(record)
    return out



def read_json_array(text: str, path: Path) -> list[dict]:
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise PipelineError(f"not valid JSON: {exc}", where=paths.display(path), fix="fix the file (a JSON array of objects, or JSONL)") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise PipelineError("expected a JSON array of objects", where=paths.display(path), fix="write the records as [{...}, {...}] or as JSONL")
    return data


def read_delimited(text: str, path: Path, delimiter: str) -> list[dict]:
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(
            io.BytesIO(text.encode("utf-8")),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
        )
    except Exception as exc:  # pyarrow raises ArrowInvalid with the row in its message
        raise PipelineError(f"cannot parse: {str(exc).splitlines()[0]}", where=paths.display(path), fix="check quoting and the number of columns") from None
    return table.to_pylist()


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:
        raise PipelineError(f"cannot read Parquet: {str(exc).splitlines()[0]}", where=paths.display(path), fix="check the file") from None


def read_saved_hf_dataset(folder: Path) -> dict:
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        return {SPLIT_ALIASES.get(name, None): ds.to_list() for name, ds in loaded.items()}
    return {None: loaded.to_list()}


def read_hub_dataset(name: str) -> dict:
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # offline, missing or gated datasets raise many different types
        raise PipelineError(
            f"cannot load hub dataset {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            where="data.source",
            fix="when offline, save it once with `datasets` (save_to_disk) and point data.source at that folder",
        ) from None
    return {SPLIT_ALIASES.get(split): ds.to_list() for split, ds in loaded.items()}


def chunk_document(text: str, tokenizer, budget: int) -> list[str]:
    """Split a document at paragraph, then line, then token boundaries into chunks of <= budget tokens."""
    pieces = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    pieces = [q for p in pieces for q in split_to_budget(p, tokenizer, budget)]
    lengths = quality.token_lengths(tokenizer, pieces)
    chunks, current, used = [], [], 0
    for piece, length in zip(pieces, lengths):
        if current and used + length > budget:
            chunks.append("\n\n".join(current))
            current, used = [], 0
        current.append(piece)
        used += int(length) + 2
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def split_to_budget(paragraph: str, tokenizer, budget: int) -> list[str]:
    if int(quality.token_lengths(tokenizer, [paragraph])[0]) <= budget:
        return [paragraph]
    lines = [line for line in paragraph.split("\n") if line.strip()]
    if len(lines) > 1:
        return [q for line in lines for q in split_to_budget(line, tokenizer, budget)]
    ids = tokenizer.encode(paragraph)
    return [tokenizer.decode(ids[i : i + budget]) for i in range(0, len(ids), budget)]


# --- splits ------------------------------------------------------------------------------------


def assign_splits(sources: list[dict], cfg) -> dict[str, list[tuple[dict, dict]]]:
    """{split: [(record, raw-ish origin)]}: given splits kept, the rest shuffled with data.seed and cut by ratio."""
    ratios = {name: float(cfg.data.splits[name]) for name in SPLITS}
    if any(r < 0 for r in ratios.values()) or sum(ratios.values()) <= 0:
        raise PipelineError("split ratios must be >= 0 and not all 0", where="data.splits", fix="e.g. {train: 0.8, valid: 0.1, test: 0.1}")
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
            raise PipelineError(f"the {name} split is empty", where="data.source", fix=f"add records, give a {name} file, or set data.splits.{name}=0")
    return given


# --- cleaning ----------------------------------------------------------------------------------


def special_tokens(tokenizer) -> dict:
    return {"bos_token": getattr(tokenizer, "bos_token", "") or "", "eos_token": getattr(tokenizer, "eos_token", "") or ""}


def training_text(record: dict, kind: str, template: dict, special: dict) -> str:
    if kind == "text":
        return record["text"]
    messages = record["messages"] if kind == "messages" else records_mod.completions_to_messages(record)["messages"]
    return records_mod.render_chat(template, messages, special, tools=record.get("tools"))


def render_text(record: dict, kind: str, template: dict, special: dict) -> dict:
    return {"text": training_text(record, kind, template, special)}


def clean_splits(splits, kind, template, special, tokenizer, cfg) -> tuple[dict, dict]:
    report = {"splits": {}}
    cleaned = {}
    for name in SPLITS:
        recs = [records_mod.completions_to_messages(r) if kind == "messages" and "prompt" in r else r for r in splits[name]]
        cleaned[name], report["splits"][name] = clean_one_split(name, recs, kind, template, special, tokenizer, cfg)
    report["contamination"] = decontaminate(cleaned, cfg)
    for name in SPLITS:
        report["splits"][name]["records_out"] = len(cleaned[name])
    return cleaned, report


def clean_one_split(name, recs, kind, template, special, tokenizer, cfg) -> tuple[list[dict], dict]:
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
    recs, stats["secrets"] = handle_secrets(name, recs, texts, cfg.prepare.secrets)
    rendered = [training_text(r, kind, template, special) for r in recs]
    lengths = quality.token_lengths(tokenizer, rendered)
    recs, lengths, stats["too_long"] = handle_too_long(name, recs, lengths, kind, tokenizer, cfg)
    stats["tokens"] = quality.length_stats(lengths)
    stats["field_presence"] = quality.field_presence([quality.present_fields(r) for r in recs])
    return recs, stats


def handle_secrets(split: str, recs: list[dict], texts: list[str], policy: str) -> tuple[list[dict], dict]:
    found = quality.find_secrets(texts)
    findings = [{"split": split, "record": i + 1, "type": f["type"], "line": f["line"]} for i, fs in sorted(found.items()) for f in fs]
    if found and policy == "fail":
        first = findings[0]
        raise PipelineError(
            f"{len(found)} record(s) hold secrets, first: {first['type']} in {split} record {first['record']} line {first['line']}",
            where="data",
            fix="remove them from the source, or set prepare.secrets=redact (replace them) or warn (keep them)",
        )
    if found and policy == "redact":
        recs = [quality.redact(r, [f["value"] for f in found[i]]) if i in found else r for i, r in enumerate(recs)]
    if found:
        log.warning("%s: %d record(s) hold secrets (%s)", split, len(found), "redacted" if policy == "redact" else "kept: prepare.secrets=warn")
    return recs, {"records": len(found), "policy": policy, "findings": findings[:100]}


def handle_too_long(split, recs, lengths, kind, tokenizer, cfg):
    limit = cfg.data.max_seq_length
    over = [i for i, n in enumerate(lengths) if n > limit]
    stats = {"limit": limit, "records": len(over), "policy": cfg.prepare.too_long}
    if not over:
        return recs, lengths, stats
    if cfg.prepare.too_long == "fail":
        raise PipelineError(
            f"{len(over)} {split} record(s) are longer than {limit} tokens (first: record {over[0] + 1}, {int(lengths[over[0]])} tokens)",
            where="data.max_seq_length",
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


def truncate_text(record: dict, tokenizer, limit: int) -> dict:
    return {"text": tokenizer.decode(tokenizer.encode(record["text"])[:limit])}


def decontaminate(cleaned: dict, cfg) -> dict:
    keys = {name: [quality.normalized_key(quality.prompt_side_text(r)) for r in cleaned[name]] for name in SPLITS}
    result = {name: quality.contamination(keys["train"], keys[name], cfg.prepare.contamination_ngram) for name in ("valid", "test")}
    removed = 0
    if cfg.prepare.decontaminate:
        held_out = set(keys["valid"]) | set(keys["test"])
        keep = [r for r, k in zip(cleaned["train"], keys["train"]) if k not in held_out]
        removed = len(cleaned["train"]) - len(keep)
        cleaned["train"] = keep
    result["train_records_removed"] = removed
    return result


def collect_tool_schemas(sources: list[dict]) -> dict | None:
    schemas = {}
    for source in sources:
        schemas.update(source["tool_schemas"] or {})
    return schemas or None


# --- outputs -----------------------------------------------------------------------------------


def write_outputs(stage, cfg, cleaned, kind, template, sources, report, tool_schemas, model_manifest) -> dict:
    staging = paths.DATA_DIR / ".prepare-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        final = stage_files(staging, cfg, cleaned, kind, template, sources, report, tool_schemas, model_manifest)
        for name in final:
            (staging / name).replace(paths.DATA_DIR / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    inputs = [file_entry("model", paths.MODEL_MANIFEST)] + [
        {"role": "source", "path": s["path"], "sha256": s["sha256"], "bytes": s["bytes"]} for s in sources
    ]
    outputs = [file_entry(name.split(".")[0], paths.DATA_DIR / name) for name in final]
    stage.finish(paths.DATA_DIR / "prepare.manifest.json", inputs, outputs, {"format": kind, "records": {n: len(cleaned[n]) for n in SPLITS}})
    return {name: paths.DATA_DIR / name for name in final}


def stage_files(staging, cfg, cleaned, kind, template, sources, report, tool_schemas, model_manifest) -> list[str]:
    names = []
    catalog = {"format": kind, "splits": {}}
    for split in SPLITS:
        path = staging / f"{split}.jsonl"
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in cleaned[split]))
        catalog["splits"][split] = {
            "path": f"data/{split}.jsonl",
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
    source_fields = [{"path": s["path"], "format": s["format"], "records": len(s["raw"]), "field_presence": s["field_presence"]} for s in sources]
    full_report = {"format": kind, "template": template["id"], "sources": source_fields, **report}
    contracts.write_json(staging / "data_report.json", full_report, "data_report")
    (staging / "data_report.md").write_text(report_markdown(full_report, catalog), encoding="utf-8")
    return names + ["data_contract.json", "data_catalog.json", "data_report.json", "data_report.md"]


RECORD_SCHEMAS = {
    "text": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
    "completions": {"type": "object", "required": ["prompt", "completion"], "properties": {"prompt": {"type": "string"}, "completion": {"type": "string"}}},
    "messages": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "messages": {
                "type": "array",
                "items": {"type": "object", "required": ["role", "content"], "properties": {"role": {"enum": list(records_mod.ROLES)}, "content": {"type": "string"}}},
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
        "template": {"id": template["id"], "origin": template["origin"], "source": template["source"], "sha256": hashing.sha256_json(template["source"])},
        "max_seq_length": cfg.data.max_seq_length,
        "sources": [
            {"source": s["source"], "path": s["path"], "sha256": s["sha256"], "bytes": s["bytes"], "format": s["format"], "records": len(s["raw"])}
            for s in sources
        ],
        "splits": {name: f"data/{name}.jsonl" for name in SPLITS},
        "tool_schemas": "data/tool_schemas.json" if tool_schemas else None,
        "tokenizer": {"model": output_path(model_manifest, "model").name, "sha256": model_manifest["outputs"][0]["sha256"]},
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
    row(f"longer than {report['splits']['train']['too_long']['limit']} tokens", lambda s: f"{s['too_long']['records']} ({s['too_long']['policy']})")
    row("records with secrets", lambda s: s["secrets"]["records"])
    row("records with control characters", lambda s: s["control_characters"])
    for stat in ("min", "median", "p95", "max", "total"):
        row(f"tokens {stat}", lambda s, stat=stat: s["tokens"][stat])
    contamination = report["contamination"]
    lines = [
        "# Data report",
        "",
        f"Format **{report['format']}**, template **{report['template']}**. Token counts use the base model's tokenizer.",
        "",
        *rows,
        "",
        "## Contamination (train vs held-out)",
        "",
        "| split | records | same as a train record | share a word {n}-gram with train |".format(n=contamination["valid"]["ngram_n"]),
        "|---|---|---|---|",
        *[f"| {s} | {contamination[s]['records']} | {contamination[s]['exact']} | {contamination[s]['ngram']} |" for s in ("valid", "test")],
        "",
        f"Train records removed because they equal a held-out record: {contamination['train_records_removed']}.",
    ]
    lines += ["", "## Sources", "", "| source | format | records | fields present (share of records) |", "|---|---|---|---|"]
    lines += [
        f"| {s['path']} | {s['format']} | {s['records']} | " + ", ".join(f"{k} {v:.0%}" for k, v in s["field_presence"].items()) + " |"
        for s in report["sources"]
    ]
    if report["skipped_lines"]:
        lines += ["", f"## Skipped malformed lines ({len(report['skipped_lines'])})", ""]
        lines += [f"- `{s['where']}`: {s['error']}" for s in report["skipped_lines"][:50]]
    secrets = [f for s in SPLITS for f in report["splits"][s]["secrets"]["findings"]]
    if secrets:
        lines += ["", "## Secrets found", ""] + [f"- {f['split']} record {f['record']}, line {f['line']}: {f['type']}" for f in secrets[:50]]
    return "\n".join(lines) + "\n"


def load_tokenizer(model_dir: Path):
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    return mlx_load_tokenizer(model_dir)


if __name__ == "__main__":
    sys.exit(main())
