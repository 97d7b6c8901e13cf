"""prepare's sources: every supported file, folder and dataset read into records.

Files (JSONL, JSON arrays, CSV/TSV, Parquet, .txt/.md documents cut into chunks), folders of them
(train.*/valid.*/test.* files kept as those splits), saved Hugging Face datasets, hub datasets, and
the builtin tool-call dataset. Each source is normalized (prepare.records) into the records mlx-lm reads.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path

from pipeline import credentials, hashing, manifest, paths
from pipeline.errors import PipelineError

import orjson
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from prepare import quality, toolcalls_dataset
from prepare import records as records_mod

log = logging.getLogger("prepare")

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "valid": "valid",
    "validation": "valid",
    "val": "valid",
    "dev": "valid",
    "test": "test",
    "testing": "test",
}
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
DOCUMENT_SUFFIXES = (".txt", ".md")
BUILTIN_DATASETS = ("tool-calls",)


def source_list(source) -> list[str]:
    items = [source] if isinstance(source, str) else list(source)
    if not items:
        raise PipelineError(
            "no data source given", where="data.source", fix="set data.source to a file, a folder or builtin:tool-calls"
        )
    return [str(s) for s in items]


def read_source(source: str, cfg, tokenizer, skipped: list) -> dict:
    """{"source", "path", "sha256", "bytes", "format", "kind", "splits": {split|None: records}, "raw": [...]}."""
    if source.startswith("builtin:"):
        return builtin_source(source.removeprefix("builtin:"), cfg)
    path = paths.resolve(source)
    if path.is_file():
        info = fingerprint(path)
        raw = {split_of(path): read_file(path, cfg, tokenizer, skipped)}
    elif path.is_dir():
        info = fingerprint(path)
        raw = read_folder(path, cfg, tokenizer, skipped)
    elif path.suffix.lower() in TABLE_SUFFIXES + DOCUMENT_SUFFIXES:
        raise PipelineError(
            "data file not found",
            where=paths.display(path),
            fix="check the path in data.source (relative to the project)",
        )
    elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) and not source.startswith("."):
        raw = read_hub_dataset(source)
        info = {"path": f"hub:{source}", "sha256": hashing.sha256_json({"hub": source}), "bytes": 0}
    else:
        raise PipelineError(
            f"data source '{source}' does not exist",
            where="data.source",
            fix="give an existing file or folder, builtin:tool-calls, or a hub dataset id",
        )
    return normalize_source(source, info, raw, cfg)


def fingerprint(path: Path) -> dict:
    """{"path", "sha256", "bytes", "files"} of a file or folder source: each file's path, bytes and sha256,
    what `make` compares on every run (pipeline.stages.stale_sources) to run prepare again when one changed.
    Taken before the records are read, so an edit made while prepare reads is seen by the next make. Through
    the shared sha256 cache: the next make re-reads no file whose size and mtime are the same."""
    shown = paths.display(path)
    cache = manifest.digests()
    found = hashing.fingerprint(path, cache.sized, shown)
    cache.save()
    return {"path": shown, **found}


def normalize_source(source: str, info: dict, raw: dict, cfg) -> dict:
    field_map = dict(cfg.data.field_map)
    mapped = {split: records_mod.apply_field_map(recs, field_map) for split, recs in raw.items()}
    every = [r for recs in mapped.values() for r in recs]
    if not every:
        raise PipelineError(
            "the source holds no records", where=info["path"], fix="check the path, or the file's content"
        )
    fmt = cfg.data.format if cfg.data.format != "auto" else records_mod.detect_format(every, info["path"])
    if fmt not in records_mod.INPUT_FORMATS:
        raise PipelineError(
            f"unknown data.format '{fmt}'", where="data.format", fix="use auto, " + ", ".join(records_mod.INPUT_FORMATS)
        )
    splits, kind = {}, None
    for split, recs in mapped.items():
        kind, splits[split] = records_mod.normalize(recs, fmt, info["path"]) if recs else (kind, [])
    kind = kind or {"text": "text", "completions": "completions"}.get(fmt, "messages")
    log.info("read %s: %d records, format %s", info["path"], len(every), fmt)
    presence = quality.field_presence(every)
    return {
        "source": source,
        **info,
        "format": fmt,
        "kind": kind,
        "splits": splits,
        "raw": every,
        "field_presence": presence,
        "tool_schemas": None,
    }


def builtin_source(name: str, cfg) -> dict:
    if name not in BUILTIN_DATASETS:
        raise PipelineError(
            f"no builtin dataset named '{name}'",
            where="data.source",
            fix="builtin datasets: " + ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS),
        )
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
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES + DOCUMENT_SUFFIXES
    )
    if not files:
        raise PipelineError(
            "no data files in the folder",
            where=paths.display(folder),
            fix="supported: " + " ".join(TABLE_SUFFIXES + DOCUMENT_SUFFIXES),
        )
    grouped: dict = {}
    for path in files:
        split = split_of(path)
        grouped[split] = grouped.get(split, records_mod.Located()) + read_file(path, cfg, tokenizer, skipped)
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
    raise PipelineError(
        f"unsupported file type {suffix}",
        where=paths.display(path),
        fix="supported: " + " ".join(TABLE_SUFFIXES + DOCUMENT_SUFFIXES),
    )


def read_utf8(path: Path) -> str:
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PipelineError(
            "the file is UTF-16 text (it starts with a UTF-16 byte order mark); records must be UTF-8",
            where=paths.display(path),
            fix=f"re-save it as UTF-8, e.g. `iconv -f utf-16 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PipelineError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            where=f"{paths.display(path)}:{line}",
            fix="re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`",
        ) from exc
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def read_jsonl(text: str, path: Path, on_error: str, skipped: list) -> list[dict]:
    out = records_mod.Located()
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
            ) from exc
        out.append(record)
        out.origins.append(f"{paths.display(path)}:{line_no}")
    return out


def read_json_array(text: str, path: Path) -> list[dict]:
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise PipelineError(
            f"not valid JSON: {exc}", where=paths.display(path), fix="fix the file (a JSON array of objects, or JSONL)"
        ) from exc
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise PipelineError(
            "expected a JSON array of objects",
            where=paths.display(path),
            fix="write the records as [{...}, {...}] or as JSONL",
        )
    return data


def read_delimited(text: str, path: Path, delimiter: str) -> list[dict]:
    try:
        table = pacsv.read_csv(
            io.BytesIO(text.encode("utf-8")),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
        )
    except Exception as exc:  # pyarrow raises ArrowInvalid with the row in its message
        raise PipelineError(
            f"cannot parse: {str(exc).splitlines()[0]}",
            where=_ragged_row(text, path, delimiter),
            fix="check quoting and the number of columns",
        ) from exc
    starts = _row_lines(text, delimiter)
    records = table.to_pylist()
    return records_mod.Located(records, [f"{paths.display(path)}:{line}" for line in starts[: len(records)]])


def _row_lines(text: str, delimiter: str) -> list[int]:
    """The line each data row starts on (values may hold newlines), header excluded."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    starts, line = [], 1
    for _ in reader:
        starts.append(line)
        line = reader.line_num + 1
    return starts[1:]


def _ragged_row(text: str, path: Path, delimiter: str) -> str:
    """path:line of the first row whose number of fields differs from the header's."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header, line = None, 1
    for row in reader:
        if header is None:
            header = row
        elif row and len(row) != len(header):
            return f"{paths.display(path)}:{line}"
        line = reader.line_num + 1
    return paths.display(path)


def read_parquet(path: Path) -> list[dict]:
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:
        raise PipelineError(
            f"cannot read Parquet: {str(exc).splitlines()[0]}", where=paths.display(path), fix="check the file"
        ) from exc


def read_saved_hf_dataset(folder: Path) -> dict:
    import datasets  # heavy (~1 s) and only for saved or hub datasets: kept off the common path

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets and pyarrow raise many types for a damaged folder
        raise PipelineError(
            f"cannot read the saved dataset: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            where=paths.display(folder),
            fix="save it again with Dataset.save_to_disk, or export it to JSONL",
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return {SPLIT_ALIASES.get(name, None): ds.to_list() for name, ds in loaded.items()}
    return {None: loaded.to_list()}


def read_hub_dataset(name: str) -> dict:
    import datasets  # heavy (~1 s) and only for saved or hub datasets: kept off the common path

    try:
        loaded = datasets.load_dataset(name, token=credentials.hf_token())
    except Exception as exc:  # offline, missing or gated datasets raise many different types
        raise PipelineError(
            f"cannot load hub dataset {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            where="data.source",
            fix="when offline, save it once with `datasets` (save_to_disk) and point data.source at that folder",
        ) from exc
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
