"""prepare stage: every input and record format, the quality report, contracts, and bad input."""

from __future__ import annotations

import json
import random
import shutil
import time

from pipeline import contracts, hashing, paths

import datasets
import huggingface_hub.constants
import orjson
import pytest
from jsonschema import Draft202012Validator
from mlx_lm.utils import load_tokenizer

import model as model_stage
import prepare
from fixtures import datasets as fx
from helpers import REPO, error_line
from lm import chat_template
from prepare import toolcalls

OUTPUT_FILES = (
    "train.jsonl",
    "valid.jsonl",
    "test.jsonl",
    "data_contract.json",
    "data_catalog.json",
    "data_report.json",
    "data_report.md",
    "prepare.manifest.json",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return fx.write_all(tmp_path_factory.mktemp("datasets"))


def run_prepare(*overrides: str) -> int:
    return prepare.main(list(overrides))


def outputs() -> dict:
    read = {
        name: contracts.read_json(paths.DATA_DIR / f"{name}.json", name)
        for name in ("data_contract", "data_catalog", "data_report")
    }
    read["splits"] = {
        s: [json.loads(line) for line in (paths.DATA_DIR / f"{s}.jsonl").read_text().splitlines()]
        for s in prepare.SPLITS
    }
    return read


@pytest.mark.parametrize(
    "name, extra, source_format, kind, records",
    [
        ("messages.jsonl", [], "messages", "messages", 40),
        ("sharegpt.jsonl", [], "sharegpt", "messages", 40),
        ("alpaca.json", [], "alpaca", "messages", 40),
        ("completions.csv", [], "completions", "completions", 41),
        (
            "custom_columns.tsv",
            ["data.field_map={prompt: question, completion: answer}"],
            "completions",
            "completions",
            40,
        ),
        ("notes.parquet", [], "text", "text", 40),
        ("given_splits", [], "completions", "completions", 60),
        ("hf_saved", [], "messages", "messages", 40),
    ],
)
def test_every_input_format(base, files, name, extra, source_format, kind, records):
    assert run_prepare(f"data.source={files[name]}", *extra) == 0
    out = outputs()
    assert out["data_contract"]["format"] == kind
    assert out["data_contract"]["sources"][0]["format"] == source_format
    assert out["data_contract"]["sources"][0]["records"] == records
    report = out["data_report"]["splits"]
    assert sum(report[s]["records_out"] for s in prepare.SPLITS) == records
    for split in prepare.SPLITS:
        catalog = out["data_catalog"]["splits"][split]
        assert catalog["records"] == len(out["splits"][split]) == report[split]["records_out"] > 0
        assert catalog["sha256"] == hashing.sha256_file(paths.DATA_DIR / f"{split}.jsonl")
        assert report[split]["tokens"]["total"] == catalog["tokens"] > 0
        record_schema = Draft202012Validator(out["data_contract"]["record_schema"])
        assert all(record_schema.is_valid(r) for r in out["splits"][split])
    for name_ in OUTPUT_FILES:
        assert (paths.DATA_DIR / name_).is_file()


def test_normalized_records_keep_every_turn(base, files):
    assert run_prepare(f"data.source={files['sharegpt.jsonl']}", "prepare.dedupe=false") == 0
    records = [r for s in prepare.SPLITS for r in outputs()["splits"][s]]
    tool_chats = [r for r in records if any(m["role"] == "tool" for m in r["messages"])]
    assert len(tool_chats) == 10
    roles = [m["role"] for m in tool_chats[0]["messages"]]
    assert roles[-4:] == ["user", "assistant", "tool", "assistant"]


def test_alpaca_input_and_history_become_turns(base, files):
    assert run_prepare(f"data.source={files['alpaca.json']}") == 0
    records = [r for s in prepare.SPLITS for r in outputs()["splits"][s]]
    with_history = [r for r in records if r["messages"][-2]["content"].startswith("Question 7:")][0]
    assert [m["role"] for m in with_history["messages"]] == ["user", "assistant", "user", "assistant"]
    assert with_history["messages"][0]["content"] == "Hello!"
    assert with_history["messages"][-2]["content"].endswith("Context: visiting in month 8.")


def test_messages_tools_reach_the_prompt_and_field_presence_is_reported(base, files):
    assert run_prepare(f"data.source={files['messages.jsonl']}") == 0
    out = outputs()
    records = [r for s in prepare.SPLITS for r in out["splits"][s]]
    # the tiny model's ChatML template does not render tools: they are in the system prompt instead
    assert sum(toolcalls.TOOLS_PREAMBLE in r["messages"][0]["content"] for r in records) == 5
    assert not any("tools" in r for r in records)
    assert out["data_report"]["tools"]["records_moved"]["tools"] == 5
    presence = out["data_report"]["sources"][0]["field_presence"]
    assert presence == {"messages": 1.0, "tools": 0.125}
    assert out["data_report"]["splits"]["train"]["field_presence"]["role:assistant"] == 1.0


def test_alpaca_field_presence_counts_optional_fields(base, files):
    assert run_prepare(f"data.source={files['alpaca.json']}") == 0
    presence = outputs()["data_report"]["sources"][0]["field_presence"]
    assert presence["instruction"] == 1.0 and presence["input"] == 0.5 and presence["system"] == 0.35


def test_given_splits_are_kept(base, files):
    assert run_prepare(f"data.source={files['given_splits']}") == 0
    counts = {s: len(outputs()["splits"][s]) for s in prepare.SPLITS}
    assert counts == {"train": 40, "valid": 10, "test": 10}


def test_documents_are_chunked_by_token_budget(base, files):

    assert run_prepare(f"data.source={files['journal']}", "prepare.chunk_tokens=120") == 0
    out = outputs()
    assert out["data_contract"]["format"] == "text"
    tokenizer = load_tokenizer(
        paths.resolve(contracts.read_json(paths.MODEL_MANIFEST, "run_manifest")["outputs"][0]["path"])
    )
    chunks = [r["text"] for s in prepare.SPLITS for r in out["splits"][s]]
    assert len(chunks) > 6  # more chunks than documents
    assert max(len(tokenizer.encode(c)) for c in chunks) <= 120
    assert out["data_report"]["splits"]["train"]["tokens"]["max"] <= 120


def test_seeded_split_is_reproducible_and_seed_dependent(base, files):
    assert run_prepare(f"data.source={files['messages.jsonl']}") == 0
    first = (paths.DATA_DIR / "train.jsonl").read_bytes()
    assert run_prepare(f"data.source={files['messages.jsonl']}") == 0
    assert (paths.DATA_DIR / "train.jsonl").read_bytes() == first
    assert run_prepare(f"data.source={files['messages.jsonl']}", "data.seed=1") == 0
    assert (paths.DATA_DIR / "train.jsonl").read_bytes() != first


def test_planted_duplicates_secret_and_overlap_are_found(base, tmp_path):
    pairs = fx.qa_pairs(40)
    train = [{"prompt": q, "completion": a} for q, a in pairs[:30]]
    train.append(dict(train[0]))  # exact duplicate
    train.append(
        {"prompt": train[1]["prompt"].upper() + "  ", "completion": train[1]["completion"].upper()}
    )  # normalized duplicate
    train.append({"prompt": "Store this for me", "completion": "Sure: AKIAIOSFODNN7EXAMPLE is your AWS key."})
    train.append(
        {
            "prompt": "Key?",
            "completion": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        }
    )
    test = [{"prompt": q, "completion": a} for q, a in pairs[30:38]]
    train.append(dict(test[0]))  # train/test overlap
    folder = tmp_path / "planted"
    fx.write_jsonl(folder / "train.jsonl", train)
    fx.write_jsonl(folder / "valid.jsonl", [{"prompt": q, "completion": a} for q, a in pairs[38:]])
    fx.write_jsonl(folder / "test.jsonl", test)
    assert run_prepare(f"data.source={folder}") == 0
    report = outputs()["data_report"]
    train_report = report["splits"]["train"]
    assert train_report["duplicates_removed"] == {"exact": 1, "normalized": 1}
    assert train_report["secrets"]["records"] == 2
    assert {f["type"] for f in train_report["secrets"]["findings"]} == {"AWS Access Key", "Private Key"}
    assert report["contamination"]["test"]["exact"] == 1
    assert report["contamination"]["train_records_removed"] == 1
    assert train_report["records_out"] == len(train) - 2 - 1
    markdown = (paths.DATA_DIR / "data_report.md").read_text()
    assert "AWS Access Key" in markdown and "| exact duplicates removed | 1 |" in markdown
    assert "AKIAIOSFODNN7EXAMPLE" not in (paths.DATA_DIR / "data_report.json").read_text()

    assert run_prepare(f"data.source={folder}", "prepare.secrets=redact") == 0
    assert "AKIAIOSFODNN7EXAMPLE" not in (paths.DATA_DIR / "train.jsonl").read_text()
    assert "[REDACTED]" in (paths.DATA_DIR / "train.jsonl").read_text()


def test_secret_policy_fail_leaves_previous_outputs(base, files, tmp_path, caplog):
    assert run_prepare(f"data.source={files['messages.jsonl']}") == 0
    before = {name: (paths.DATA_DIR / name).read_bytes() for name in OUTPUT_FILES}
    records = fx.openai_messages()
    records[3]["messages"][-1]["content"] = "my token is ghp_abcdefghijklmnopqrstuvwxyz0123456789"
    leaky = fx.write_jsonl(tmp_path / "leaky.jsonl", records)
    assert run_prepare(f"data.source={leaky}", "prepare.secrets=fail") == 2
    assert "GitHub Token" in caplog.text
    assert {name: (paths.DATA_DIR / name).read_bytes() for name in OUTPUT_FILES} == before
    assert not (paths.DATA_DIR / ".prepare-staging").exists()


def test_bom_and_crlf_are_handled_silently(base, tmp_path):
    lines = [json.dumps({"prompt": q, "completion": a}) for q, a in fx.qa_pairs()]
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    assert run_prepare(f"data.source={path}") == 0
    records = [r for s in prepare.SPLITS for r in outputs()["splits"][s]]
    assert len(records) == 40 and not any("\r" in r["completion"] for r in records)


def test_malformed_line_names_file_line_and_text(base, tmp_path, caplog):
    lines = [json.dumps({"prompt": q, "completion": a}) for q, a in fx.qa_pairs()]
    lines[6] = '{"prompt": "unterminated'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert run_prepare(f"data.source={path}") == 2
    line = error_line(caplog)
    assert "bad.jsonl:7" in line and "unterminated" in line and "prepare.on_error=skip" in line
    assert not (paths.DATA_DIR / "train.jsonl").exists()

    caplog.clear()
    assert run_prepare(f"data.source={path}", "prepare.on_error=skip") == 0
    report = outputs()["data_report"]
    assert len(report["skipped_lines"]) == 1 and report["skipped_lines"][0]["where"].endswith("bad.jsonl:7")
    assert sum(report["splits"][s]["records_out"] for s in prepare.SPLITS) == 39


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "only a prompt"}\n' * 5, "unknown record format (fields found: prompt)"),
        (
            '{"instruction": "x", "output": 3}\n' * 5,
            "data.jsonl:1: the record is not valid alpaca: field 'output' must be a string",
        ),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}\n' * 5, "unknown role 'wizard'"),
        ("", "the source holds no records"),
    ],
)
def test_bad_records_fail_with_one_line(base, tmp_path, caplog, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    assert run_prepare(f"data.source={path}") == 2
    assert message in error_line(caplog)


def test_hub_dataset_offline_is_a_clear_error(base, monkeypatch, caplog):

    # Offline mode is read when the libraries are imported, which earlier tests already did.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert run_prepare("data.source=someone/some-dataset") == 2
    line = error_line(caplog)
    assert "cannot load hub dataset someone/some-dataset" in line and "save_to_disk" in line


def test_non_utf8_names_the_line(base, tmp_path, caplog):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert run_prepare(f"data.source={path}") == 2
    line = error_line(caplog)
    assert "latin1.jsonl:2" in line and "not UTF-8" in line and "iconv" in line


def test_empty_split_is_an_error(base, tmp_path, caplog):
    path = fx.write_jsonl(tmp_path / "two.jsonl", [{"text": "one"}, {"text": "two"}])
    assert run_prepare(f"data.source={path}") == 2
    assert "split is empty" in error_line(caplog)


@pytest.mark.parametrize(
    "policy, expect_rc, expect_count", [("drop", 0, 40 - 5), ("truncate", 0, 40), ("fail", 2, None)]
)
def test_too_long_policies(base, tmp_path, policy, expect_rc, expect_count):
    texts = [f"short note {i} about {fx.CITIES[i % 12]}" for i in range(35)] + [
        " ".join(["very long text"] * 200) + f" {i}" for i in range(5)
    ]
    path = fx.write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    assert run_prepare(f"data.source={path}", "data.max_seq_length=64", f"prepare.too_long={policy}") == expect_rc
    if expect_rc == 0:
        report = outputs()["data_report"]
        assert sum(report["splits"][s]["records_out"] for s in prepare.SPLITS) == expect_count
        assert sum(report["splits"][s]["too_long"]["records"] for s in prepare.SPLITS) == 5
        assert max(report["splits"][s]["tokens"]["max"] for s in prepare.SPLITS) <= 64


def test_named_template_is_recorded_in_the_contract(base, files):
    assert run_prepare(f"data.source={files['messages.jsonl']}", "prepare.template=alpaca") == 0
    template = outputs()["data_contract"]["template"]
    assert template["id"] == "alpaca" and "### Instruction" in template["source"]


def test_model_without_chat_template_gets_rendered_text(project, tiny_model_dir, tmp_path, files):

    plain = tmp_path / "plain-model"
    shutil.copytree(tiny_model_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink()
    assert model_stage.main([f"model.source={plain}"]) == 0
    assert run_prepare(f"data.source={files['messages.jsonl']}") == 0
    out = outputs()
    assert out["data_contract"]["format"] == "text" and out["data_contract"]["template"]["id"] == "chatml"
    assert out["splits"]["train"][0]["text"].startswith("<|im_start|>")


def test_model_template_render_matches_the_tokenizer(base, files):

    tokenizer = load_tokenizer(
        paths.resolve(contracts.read_json(paths.MODEL_MANIFEST, "run_manifest")["outputs"][0]["path"])
    )
    template = chat_template.resolve_template("auto", tokenizer.chat_template)
    for record in fx.openai_messages(6):
        ours = chat_template.render_chat(template, record["messages"], chat_template.special_tokens(tokenizer))
        theirs = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        assert ours == theirs


def test_unknown_template_lists_the_choices(base, files, caplog):
    assert run_prepare(f"data.source={files['messages.jsonl']}", "prepare.template=vicuna") == 2
    assert "chatml" in error_line(caplog)


@pytest.mark.slow
@pytest.mark.serial  # timed
def test_default_dataset_on_the_real_model(project):

    assert model_stage.main([]) == 0
    start = time.monotonic()
    assert run_prepare() == 0
    seconds = time.monotonic() - start
    out = outputs()
    assert seconds < 30, seconds
    assert out["data_contract"]["tool_schemas"] == "data/tool_schemas.json"
    assert out["data_contract"]["template"]["origin"] == "model"
    counts = {s: out["data_catalog"]["splits"][s]["records"] for s in prepare.SPLITS}
    assert counts == {"train": 600, "valid": 60, "test": 40}  # the shipped split sizes (toolcalls_dataset.generate)
    tokens = out["data_report"]["splits"]["train"]["tokens"]
    assert 100 < tokens["median"] < 300 and tokens["max"] <= 1024  # real SmolLM2 tokenizer, not a word count
    assert out["data_report"]["contamination"]["test"]["exact"] == 0


@pytest.mark.slow
@pytest.mark.serial  # timed
def test_100k_records_in_under_60_seconds(project, tmp_path):

    rng = random.Random(0)
    words = (REPO / "README.md").read_text().split()[:400]
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        for i in range(100_000):
            user = " ".join(rng.choice(words) for _ in range(35))
            answer = " ".join(rng.choice(words) for _ in range(35))
            f.write(
                orjson.dumps(
                    {"messages": [{"role": "user", "content": f"{i} {user}"}, {"role": "assistant", "content": answer}]}
                )
                + b"\n"
            )
    assert model_stage.main([]) == 0
    start = time.monotonic()
    assert run_prepare(f"data.source={path}") == 0
    seconds = time.monotonic() - start
    print(
        f"prepare: 100k records, {path.stat().st_size / 1e6:.0f} MB in {seconds:.1f} s = "
        f"{100_000 / seconds:.0f} records/s"
    )
    assert 40e6 < path.stat().st_size < 60e6
    assert seconds < 60
    assert (
        sum(
            contracts.read_json(paths.DATA_DIR / "data_catalog.json", "data_catalog")["splits"][s]["records"]
            for s in prepare.SPLITS
        )
        == 100_000
    )
