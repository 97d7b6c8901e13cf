"""Bad input, class by class. Every case starts from a project where `make all` has succeeded, breaks one
thing a user can supply (config, data, model files, checkpoints, contract files, plugins, the disk), runs
the stage that reads it and asserts: exit code 2, exactly one error line that names the file, key or line
and says how to fix it, no traceback on the console, and every earlier output byte-identical."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline import config, stages

import datasets
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import eval as eval_stage
import fuse
import model as model_stage
import prepare
import quantize
import train
from fixtures import datasets as fx
from fixtures.tiny_gguf import write_tiny_gguf
from helpers import snapshot, write_override

STAGE_MAINS = {
    "model": model_stage.main,
    "prepare": prepare.main,
    "train": train.main,
    "fuse": fuse.main,
    "quantize": quantize.main,
    "eval": eval_stage.main,
}


@dataclasses.dataclass(frozen=True)
class Ctx:
    root: Path
    tiny_model_dir: Path

    def file(self, name: str, content: str | bytes) -> Path:
        """A user's input file under inputs/ (outside every output folder)."""
        path = self.root / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def jsonl(self, name: str, records: list) -> Path:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in records))


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    stage: str
    argv: tuple[str, ...]  # the stage's arguments; paths are relative to the project root
    names: tuple[str, ...]  # regexes the error line must match: the file, key or line, and the subject
    setup: Callable[[Ctx], object] | None = None  # what it breaks before the stage runs


CASES: list[Case] = []


def add(id: str, stage: str, argv: list[str], *names: str, setup: Callable[[Ctx], object] | None = None) -> None:
    CASES.append(Case(id, stage, tuple(argv), names, setup))


# --- config: files, syntax, keys, types, ranges, choices, interpolation ----------------------------


def append_to_override(text: str | bytes) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        path = ctx.root / "config" / "override.yaml"
        path.write_bytes(path.read_bytes() + (text.encode() if isinstance(text, str) else text))

    return setup


def edit_override(old: str, new: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        path = ctx.root / "config" / "override.yaml"
        path.write_text(path.read_text().replace(old, new))

    return setup


OVERRIDE = r"config/override\.yaml"
AT_LINE = r"config/override\.yaml:\d+"
add("yaml_unclosed_bracket", "train", [], AT_LINE, setup=append_to_override("fuse: {tolerance: [1, 2\n"))
add("yaml_tab_indent", "train", [], AT_LINE, setup=append_to_override("fuse:\n\ttolerance: 0.1\n"))
add("yaml_duplicate_section", "train", [], AT_LINE, r"train", setup=append_to_override("train:\n  iters: 3\n"))
add("yaml_not_utf8", "train", [], OVERRIDE, r"UTF-8", setup=append_to_override(b"fuse:\n  dtype: \xff\xfe\n"))
add(
    "yaml_top_level_list",
    "train",
    [],
    OVERRIDE,
    r"mapping|section",
    setup=lambda ctx: write_override(ctx.root, "- a\n"),
)
add("yaml_section_is_a_scalar", "train", [], OVERRIDE, r"fuse", setup=append_to_override("fuse: 3\n"))
add("override_file_missing", "train", ["--override", "config/nope.yaml"], r"config/nope\.yaml")
add("argument_without_equals", "train", ["train.iters"], r"train\.iters", r"KEY=VALUE|=")
add("unknown_key_close_to_a_real_one", "train", ["train.learnin_rate=1e-3"], r"train\.learnin_rate", "learning_rate")
add("unknown_section", "train", ["trian.iters=3"], r"trian", r"train")
add("key_in_the_wrong_section", "train", ["fuse.learning_rate=1e-3"], r"fuse\.learning_rate", r"train\.learning_rate")
add("int_key_given_a_word", "train", ["train.batch_size=four"], r"train\.batch_size", r"integer")
add("int_key_given_a_float", "train", ["train.iters=2.5"], r"train\.iters", r"integer")
add("bool_key_given_a_word", "train", ["train.mask_prompt=maybe"], r"train\.mask_prompt", r"true|false|bool")
add("list_key_given_a_mapping", "quantize", ["quantize.gguf_types={a: 1}"], r"quantize\.gguf_types", r"list")
add("scalar_key_given_a_list", "train", ["train.iters=[1,2]"], r"train\.iters")
add("required_key_set_to_null", "train", ["train.batch_size=null"], r"train\.batch_size")
add("negative_batch_size", "train", ["train.batch_size=-4"], r"train\.batch_size", r"at least 1|>= ?1|minimum")
add("zero_report_interval", "train", ["train.steps_per_report=0"], r"train\.steps_per_report")
add("zero_eval_interval", "train", ["train.steps_per_eval=0"], r"train\.steps_per_eval")
add("zero_save_interval", "train", ["train.save_every=0"], r"train\.save_every")
add("negative_learning_rate", "train", ["train.learning_rate=-1"], r"train\.learning_rate")
add("dropout_of_one_or_more", "train", ["train.lora.dropout=1.5"], r"train\.lora\.dropout")
add("zero_epochs", "train", ["train.epochs=0"], r"train\.epochs")
add("zero_rank", "train", ["train.lora.rank=0"], r"train\.lora\.rank")
add("zero_chunk_tokens", "prepare", ["prepare.chunk_tokens=0"], r"prepare\.chunk_tokens")
add("tiny_max_seq_length", "prepare", ["data.max_seq_length=1"], r"data\.max_seq_length")
add("dtype_typo", "train", ["train.dtype=fp32"], r"train\.dtype", r"float32")
add("split_fractions_not_summing_to_one", "prepare", ["data.splits.train=0.5"], r"data\.splits", r"sum|1")
add("negative_split_fraction", "prepare", ["data.splits.valid=-0.1"], r"data\.splits\.valid")
add("zero_eval_batch_size", "eval", ["eval.batch_size=0"], r"eval\.batch_size")
add("unknown_eval_artifact_kind", "eval", ["eval.artifacts=[base,gguff]"], r"eval\.artifacts", r"gguf")
add("unknown_gguf_type", "quantize", ["quantize.gguf_types=[Q9_X]"], r"quantize\.gguf_types", r"Q9_X")
add("unknown_mlx_quantization", "quantize", ["quantize.mlx=[affine-5]"], r"quantize\.mlx", r"affine-5")
add("group_size_not_allowed", "quantize", ["quantize.group_size=48"], r"quantize\.group_size")
add("zero_tolerance", "fuse", ["fuse.tolerance=0"], r"fuse\.tolerance")
add("experiment_name_with_a_path", "train", ["experiment.name=../escape"], r"experiment\.name")
add("empty_experiment_name", "train", ["experiment.name="], r"experiment\.name")
add(
    "interpolation_of_a_missing_key", "train", ["train.iters=${train.nope}"], r"train\.iters", r"train\.nope.*not found"
)
add("interpolation_of_an_unset_env_var", "train", ["train.iters=${oc.env:NO_SUCH_VAR_X}"], r"NO_SUCH_VAR_X.*not found")
add("interpolation_syntax_error", "train", ["train.iters=${train.iters"], r"train\.iters")
add(
    "interpolation_in_the_override_file",
    "train",
    [],
    OVERRIDE,
    r"fuse\.tolerance.*nope\.key.*not found",
    setup=append_to_override("fuse:\n  tolerance: ${nope.key}\n"),
)


def enumerated_keys() -> list[tuple[str, list]]:
    return [(key, config.choices(node)) for key, node in config.schema_knobs().items() if config.choices(node)]


def owner_stage(key: str) -> str:
    section = key.split(".")[0]
    owners = [s.name for s in stages.STAGES.values() if section in s.sections and s.name != "doctor"]
    return owners[0] if owners else "prepare"


for _key, _choices in enumerated_keys():
    _typo = f"{_choices[0]}x" if isinstance(_choices[0], str) else _choices[0] + 1
    _value = f"[{_typo}]" if config.schema_knobs()[_key].get("type") == "array" else _typo
    add(f"choice_typo:{_key}", owner_stage(_key), [f"{_key}={_value}"], re.escape(_key), re.escape(str(_choices[0])))


# --- data: every format's broken forms, encodings, sizes -------------------------------------------


def qa(n: int = 40) -> list[dict]:
    return [{"prompt": q, "completion": a} for q, a in fx.qa_pairs(n)]


ASSISTANT = {"role": "assistant", "content": "fine"}


def messages(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question number {i}?"}, {**ASSISTANT, "content": f"answer {i}"}]}


def many(n: int) -> list[dict]:
    return [messages(100 + i) for i in range(n)]


def data(id: str, name: str, content: Callable[[Ctx], object] | None, *names: str, extra: tuple = ()) -> None:
    add(id, "prepare", [f"data.source=[inputs/{name}]", *extra], *names, setup=content)


def text_file(name: str, content: str | bytes) -> Callable[[Ctx], object]:
    return lambda ctx: ctx.file(name, content)


def records_file(name: str, records: list) -> Callable[[Ctx], object]:
    return lambda ctx: ctx.jsonl(name, records)


def with_line(name: str, line_no: int, bad: str) -> Callable[[Ctx], object]:
    lines = [json.dumps(r) for r in qa()]
    lines[line_no - 1] = bad
    return text_file(name, "\n".join(lines) + "\n")


def parquet_file(name: str, rows: list[dict]) -> Callable[[Ctx], object]:
    def setup(ctx: Ctx) -> None:
        path = ctx.file(name, b"")
        pq.write_table(pa.Table.from_pylist(rows), path)

    return setup


def corrupt_hf_dataset(ctx: Ctx) -> None:
    folder = ctx.root / "inputs" / "hf"
    datasets.Dataset.from_list(qa()).save_to_disk(str(folder))
    for arrow in folder.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])


def line_of(name: str, number: int) -> str:
    return re.escape(f"inputs/{name}") + rf"(:| line ){number}\b"


QA_LINES = "".join(json.dumps(r) + "\n" for r in qa())
data("data_source_missing", "missing.jsonl", None, r"inputs/missing\.jsonl", r"not found|does not exist")
data(
    "jsonl_malformed_line",
    "bad.jsonl",
    with_line("bad.jsonl", 3, '{"prompt": "x", "completion": '),
    line_of("bad.jsonl", 3),
)
data(
    "jsonl_record_missing_a_field",
    "bad.jsonl",
    with_line("bad.jsonl", 4, '{"prompt": "only a prompt"}'),
    line_of("bad.jsonl", 4),
    r"completion",
    extra=("data.format=completions",),
)
data("jsonl_line_is_an_array", "bad.jsonl", with_line("bad.jsonl", 2, "[1, 2, 3]"), line_of("bad.jsonl", 2))
data(
    "jsonl_field_of_the_wrong_type",
    "bad.jsonl",
    with_line("bad.jsonl", 5, '{"prompt": "q", "completion": 5}'),
    line_of("bad.jsonl", 5),
    r"completion",
    extra=("data.format=completions",),
)
data(
    "jsonl_not_utf8",
    "bad.jsonl",
    text_file("bad.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in qa(2)) + b'{"a": "\xff"}\n'),
    line_of("bad.jsonl", 3),
    r"UTF-8",
)
data(
    "jsonl_utf16",
    "bad.jsonl",
    text_file("bad.jsonl", QA_LINES.encode("utf-16")),
    r"inputs/bad\.jsonl",
    r"UTF-16.*utf-8",
)
data(
    "jsonl_huge_line_with_too_long_fail",
    "huge.jsonl",
    records_file("huge.jsonl", [{"prompt": "word " * 400_000, "completion": "x"}, *qa()]),
    line_of("huge.jsonl", 1),
    r"max_seq_length",
    extra=("prepare.too_long=fail",),
)
data("empty_file", "empty.jsonl", text_file("empty.jsonl", ""), r"inputs/empty\.jsonl", r"no records|empty")
data(
    "only_blank_lines", "blank.jsonl", text_file("blank.jsonl", "\n\n  \n"), r"inputs/blank\.jsonl", r"no records|empty"
)
data(
    "csv_ragged_row",
    "bad.csv",
    text_file("bad.csv", "prompt,completion\na,b\nc,d\ne,f,g\n" + "".join(f"q{i},a{i}\n" for i in range(40))),
    line_of("bad.csv", 4),
)
data(
    "csv_missing_a_column",
    "bad.csv",
    text_file("bad.csv", "question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(40))),
    r"inputs/bad\.csv",
    r"field_map",
)
data(
    "tsv_ragged_row",
    "bad.tsv",
    text_file("bad.tsv", "prompt\tcompletion\na\tb\nc\n" + "".join(f"q{i}\ta{i}\n" for i in range(40))),
    line_of("bad.tsv", 3),
)
data(
    "json_top_level_object", "bad.json", text_file("bad.json", '{"prompt": "a"}'), r"inputs/bad\.json\b", r"array|list"
)
data("json_truncated", "bad.json", text_file("bad.json", json.dumps(qa())[:-40]), r"inputs/bad\.json\b", r"JSON")
data(
    "parquet_corrupt", "bad.parquet", text_file("bad.parquet", b"PAR1" + bytes(range(256)) * 8), r"inputs/bad\.parquet"
)
data(
    "parquet_without_the_needed_columns",
    "cols.parquet",
    parquet_file("cols.parquet", [{"a": i, "b": str(i)} for i in range(40)]),
    r"inputs/cols\.parquet",
    r"field_map",
)
data("saved_hf_dataset_corrupt", "hf", corrupt_hf_dataset, r"inputs/hf", r"dataset")
data("folder_without_data_files", "empty", text_file("empty/README", "nothing here"), r"inputs/empty", r"\.jsonl")
data("unsupported_file_type", "data.xlsx", text_file("data.xlsx", b"PK"), r"inputs/data\.xlsx", r"\.jsonl")
data(
    "tools_field_not_a_list",
    "tools.jsonl",
    records_file("tools.jsonl", [messages(0), {**messages(1), "tools": "get_weather"}, *many(38)]),
    line_of("tools.jsonl", 2),
    r"tools",
)
data(
    "message_with_an_unknown_role",
    "roles.jsonl",
    records_file("roles.jsonl", [{"messages": [{"role": "robot", "content": "beep"}, ASSISTANT]}, *many(39)]),
    line_of("roles.jsonl", 1),
    r"role",
)
data(
    "message_content_not_a_string",
    "content.jsonl",
    records_file("content.jsonl", [{"messages": [{"role": "user", "content": 5}, ASSISTANT]}, *many(39)]),
    line_of("content.jsonl", 1),
    r"content",
)
data(
    "messages_list_empty",
    "nomsg.jsonl",
    records_file("nomsg.jsonl", [{"messages": []}, *many(39)]),
    line_of("nomsg.jsonl", 1),
    r"messages",
)
data("all_records_duplicates", "dups.jsonl", records_file("dups.jsonl", [qa(1)[0]] * 40), r"train", r"duplicate")
data(
    "all_records_longer_than_max_seq_length",
    "long.jsonl",
    records_file("long.jsonl", qa()),
    r"data\.max_seq_length",
    r"long",
    extra=("data.max_seq_length=8",),
)
data("too_few_records_for_three_splits", "few.jsonl", records_file("few.jsonl", qa(3)), r"valid|test", r"\d+ records?")
data(
    "field_map_to_a_missing_column",
    "qa.jsonl",
    records_file("qa.jsonl", qa()),
    r"data\.field_map",
    r"nope",
    extra=("data.field_map={prompt: nope}",),
)
data(
    "declared_format_does_not_match",
    "msgs.jsonl",
    records_file("msgs.jsonl", many(40)),
    line_of("msgs.jsonl", 1),
    r"prompt|completion",
    extra=("data.format=completions",),
)
data(
    "secret_with_secrets_fail",
    "secret.jsonl",
    records_file("secret.jsonl", [{"prompt": "my key", "completion": "AKIAIOSFODNN7EXAMPLE"}, *qa()]),
    line_of("secret.jsonl", 1),
    r"prepare\.secrets",
    extra=("prepare.secrets=fail",),
)
add("template_file_missing", "prepare", ["prepare.template=inputs/nope.jinja"], r"inputs/nope\.jinja", r"not found")
add(
    "template_not_utf8",
    "prepare",
    ["prepare.template=inputs/bad.jinja"],
    r"inputs/bad\.jinja",
    r"UTF-8",
    setup=text_file("bad.jinja", b"{{ messages }}\xff"),
)
add(
    "template_syntax_error",
    "prepare",
    ["prepare.template=inputs/bad.jinja"],
    r"inputs/bad\.jinja:\d+",
    setup=text_file("bad.jinja", "ok\n{% for m in messages %}\n{{ m.content }"),
)


# --- model files ------------------------------------------------------------------------------------


def model_copy(name: str, damage: Callable[[Path], object] = lambda folder: None) -> Callable[[Ctx], object]:
    def setup(ctx: Ctx) -> None:
        folder = ctx.root / "inputs" / name
        shutil.copytree(ctx.tiny_model_dir, folder)
        damage(folder)

    return setup


def tiny_gguf(damage: Callable[[Path], object]) -> Callable[[Ctx], object]:
    def setup(ctx: Ctx) -> None:
        path = ctx.root / "inputs" / "tiny.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        damage(write_tiny_gguf(ctx.tiny_model_dir, path))

    return setup


def truncated(keep: float) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return damage


def model(id: str, source: str, setup, *names: str) -> None:
    add(id, "model", [f"model.source={source}"], *names, setup=setup)


model("model_source_missing", "inputs/nomodel", None, r"model\.source", r"inputs/nomodel")
model("model_source_not_a_model_name", "not a model!", None, r"model\.source")
model("builtin_model_unknown", "builtin:nope", None, r"model\.source", r"builtin:smollm2")
model(
    "model_folder_without_config",
    "inputs/noconfig",
    model_copy("noconfig", lambda f: (f / "config.json").unlink()),
    r"inputs/noconfig",
    r"config\.json",
)
model(
    "model_config_not_json",
    "inputs/badconfig",
    model_copy("badconfig", lambda f: (f / "config.json").write_text("{not json")),
    r"inputs/badconfig/config\.json",
)
model(
    "model_weights_truncated",
    "inputs/trunc",
    model_copy("trunc", lambda f: [truncated(0.5)(w) for w in f.glob("*.safetensors")]),
    r"inputs/trunc",
)
model(
    "model_weights_garbage",
    "inputs/garbage",
    model_copy("garbage", lambda f: [w.write_bytes(bytes(range(256)) * 16) for w in f.glob("*.safetensors")]),
    r"inputs/garbage",
)
model("gguf_truncated_in_tensor_data", "inputs/tiny.gguf", tiny_gguf(truncated(0.8)), r"inputs/tiny\.gguf")
model("gguf_truncated_in_header", "inputs/tiny.gguf", tiny_gguf(truncated(0.001)), r"inputs/tiny\.gguf")
model("gguf_bad_magic", "inputs/bad.gguf", text_file("bad.gguf", b"NOPE" + bytes(4096)), r"inputs/bad\.gguf", r"GGUF")
model("gguf_empty_file", "inputs/empty.gguf", text_file("empty.gguf", b""), r"inputs/empty\.gguf")


# --- checkpoints: a run interrupted after its step-2 checkpoint, then damaged ----------------------


def interrupted_run(ctx: Ctx) -> Path:
    """The checkpoint folder a resumed run reads, holding the step-2 checkpoint of the finished run."""
    run_dir = ctx.root / "runs" / "main"
    resumable = getattr(train, "resumable_checkpoints", lambda d: d / "checkpoints")(run_dir)
    if resumable != run_dir / "checkpoints":
        shutil.copytree(run_dir / "checkpoints", resumable)
    return resumable


def damaged_checkpoint(damage: Callable[[Path], object]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        folder = interrupted_run(ctx)
        damage(folder / json.loads((folder / "latest.json").read_text())["path"])

    return setup


def bad_offsets(path: Path) -> None:
    """Keep the safetensors header's length and JSON but point every tensor past the end of the file."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    for name, entry in header.items():
        if name != "__metadata__":
            entry["data_offsets"] = [offset + 10**9 for offset in entry["data_offsets"]]
    path.write_bytes(data[:8] + json.dumps(header).encode().ljust(size)[:size] + data[8 + size :])


def checkpoint(id: str, damage: Callable[[Path], object], *names: str) -> None:
    add(id, "train", ["train.resume=require"], r"checkpoints", *names, setup=damaged_checkpoint(damage))


checkpoint(
    "checkpoint_weights_truncated", lambda s: truncated(0.5)(s / "adapters.safetensors"), r"adapters\.safetensors"
)
checkpoint(
    "checkpoint_weights_bad_offsets", lambda s: bad_offsets(s / "adapters.safetensors"), r"adapters\.safetensors"
)
checkpoint(
    "checkpoint_optimizer_garbage",
    lambda s: (s / "optimizer.safetensors").write_bytes(bytes(512)),
    r"optimizer\.safetensors",
)
checkpoint("checkpoint_state_not_json", lambda s: (s / "state.json").write_text("{step: 2"), r"state\.json")
checkpoint("checkpoint_folder_missing", shutil.rmtree, r"step-0000002")
add(
    "checkpoint_index_not_json",
    "train",
    ["train.resume=require"],
    r"checkpoints/latest\.json",
    setup=lambda ctx: (interrupted_run(ctx) / "latest.json").write_text("{"),
)


# --- contract files: hand-edited, from another version, or changed since the stage that made them -----


def edit_json(file: str, change: Callable[[dict], object]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        path = ctx.root / file
        obj = json.loads(path.read_text())
        change(obj)
        path.write_text(json.dumps(obj, indent=2))

    return setup


def write_bytes(file: str, data: bytes) -> Callable[[Ctx], object]:
    return lambda ctx: (ctx.root / file).write_bytes(data)


def contract(id: str, stage: str, file: str, setup: Callable[[Ctx], object], *names: str) -> None:
    add(id, stage, [], re.escape(file), *names, setup=setup)


DATA_CONTRACT = "data/data_contract.json"
TRAIN_MANIFEST = "runs/main/train.manifest.json"
contract(
    "data_contract_from_a_future_version",
    "train",
    DATA_CONTRACT,
    edit_json(DATA_CONTRACT, lambda o: o.update(schema_version=99)),
    r"changed since `make prepare`",
)
contract(
    "data_contract_missing_a_key",
    "train",
    DATA_CONTRACT,
    edit_json(DATA_CONTRACT, lambda o: o.pop("max_seq_length")),
    r"changed since `make prepare`",
)
contract(
    "data_contract_not_json",
    "train",
    DATA_CONTRACT,
    write_bytes(DATA_CONTRACT, b'{"schema_version": 1,'),
    r"changed since `make prepare`",
)
contract(
    "data_catalog_counts_edited",
    "train",
    "data/data_catalog.json",
    edit_json("data/data_catalog.json", lambda o: o["splits"]["train"].update(records=5)),
    r"make prepare",
)
contract(
    "train_split_edited_after_prepare",
    "train",
    "data/train.jsonl",
    write_bytes("data/train.jsonl", b'{"text": "mine"}\n'),
    r"make prepare",
)
contract(
    "train_manifest_from_a_future_version",
    "fuse",
    TRAIN_MANIFEST,
    edit_json(TRAIN_MANIFEST, lambda o: o.update(schema_version=99)),
    r"version",
)
contract("train_manifest_not_json", "fuse", TRAIN_MANIFEST, write_bytes(TRAIN_MANIFEST, b""), r"JSON")
contract(
    "adapter_weights_changed_after_train",
    "fuse",
    "runs/main/adapter",
    write_bytes("runs/main/adapter/adapters.safetensors", bytes(64)),
    r"make train",
)
contract(
    "adapter_config_edited",
    "fuse",
    "runs/main/adapter",
    edit_json("runs/main/adapter/adapter_config.json", lambda o: o.update(num_layers=1)),
    r"make train",
)
contract(
    "fused_weights_changed_after_fuse",
    "quantize",
    "runs/main/fused",
    lambda ctx: [truncated(0.5)(w) for w in (ctx.root / "runs/main/fused").glob("*.safetensors")],
    r"make fuse",
)
contract(
    "served_gguf_changed_after_quantize",
    "eval",
    "runs/main/quantized",
    lambda ctx: [truncated(0.5)(g) for g in (ctx.root / "runs/main/quantized").rglob("*.gguf")],
    r"make quantize",
)
contract(
    "artifacts_missing_a_key",
    "eval",
    "runs/main/artifacts.json",
    edit_json("runs/main/artifacts.json", lambda o: o.pop("artifacts")),
    r"artifacts",
)


def lose_the_converted_model(ctx: Ctx) -> None:
    """The tiny model is used in place: give the manifest a converted copy of its own, then lose it."""
    copy = ctx.root / "inputs" / "converted"
    shutil.copytree(ctx.tiny_model_dir, copy)
    edit_json("runs/model.manifest.json", lambda o: o["outputs"][0].update(path=str(copy)))(ctx)
    shutil.rmtree(copy)


add("converted_base_model_deleted", "train", [], r"make model", setup=lose_the_converted_model)


# --- eval plugins -----------------------------------------------------------------------------------


def plugin_module(module: str, source: str) -> Callable[[Ctx], object]:
    return lambda ctx: (ctx.root / f"{module}.py").write_text(source)


def plugin(id: str, module: str, source: str | None, *names: str, function: str = "score") -> None:
    setup = plugin_module(module, source) if source is not None else None
    add(id, "eval", [f"eval.plugins=[{module}:{function}]"], *names, setup=setup)


plugin(
    "plugin_with_a_syntax_error",
    "plugin_syntax",
    "def score(p, r, rec):\n    return (\n",
    r"plugin_syntax\.py:\d+",
)
plugin("plugin_module_missing", "no_such_plugin_module", None, r"eval\.plugins", r"no_such_plugin_module")
plugin("plugin_function_missing", "plugin_nofn", "def other(p, r, rec):\n    return 1.0\n", r"plugin_nofn", r"score")
plugin("plugin_not_callable", "plugin_notcallable", "score = 3\n", r"plugin_notcallable", r"score")
plugin(
    "plugin_raises_on_import",
    "plugin_raises",
    "raise RuntimeError('needs an API key')\n",
    r"plugin_raises",
    r"RuntimeError",
)
add("plugin_spec_without_a_function", "eval", ["eval.plugins=[my_metrics]"], r"eval\.plugins", r"module:function")
add("task_metric_unknown", "eval", ["eval.task_metric=nonesuch"], r"eval\.task_metric", r"call_f1|exact_match")


# --- writes that fail ---------------------------------------------------------------------------------


@pytest.fixture
def read_only_disk(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)


# --- the test -----------------------------------------------------------------------------------------


def console_errors(console: str) -> list[str]:
    return [line for line in console.splitlines() if re.search(r"\berror:", line)]


def assert_one_clear_error(case: Case, rc: int, console: str) -> None:
    assert "Traceback" not in console, console
    errors = console_errors(console)
    assert len(errors) == 1, f"expected one error line, got {len(errors)}:\n{console}"
    line = errors[0]
    assert rc == 2, f"exit {rc} (2 is bad input): {line}"
    assert " -- fix: " in line, f"no fix in: {line}"
    for pattern in case.names:
        assert re.search(pattern, line), f"{pattern!r} not in: {line}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, finished_copy, tiny_model_dir, capfd):
    if case.setup:
        case.setup(Ctx(finished_copy, tiny_model_dir))
    before = snapshot(finished_copy)
    capfd.readouterr()
    rc = STAGE_MAINS[case.stage](list(case.argv))
    out = capfd.readouterr()
    assert_one_clear_error(case, rc, out.out + out.err)
    assert snapshot(finished_copy) == before


@pytest.mark.parametrize("stage", ["train", "fuse", "quantize", "eval"])
def test_a_write_that_fails_is_one_line_and_leaves_no_partial_file(stage, finished_copy, read_only_disk, capfd):
    change = {"train": "train.seed=1", "fuse": "fuse.tolerance=0.5", "quantize": "quantize.check_prompts=2"}
    before = snapshot(finished_copy)
    capfd.readouterr()
    rc = STAGE_MAINS[stage]([change.get(stage, "eval.records=3")])
    out = capfd.readouterr()
    assert_one_clear_error(Case(stage, stage, (), (r"[Rr]ead-only",)), rc, out.out + out.err)
    assert snapshot(finished_copy) == before


def test_the_suite_has_at_least_60_cases():
    assert len(CASES) >= 60
