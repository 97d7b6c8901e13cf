"""prepare.toolcalls: tools and tool calls in every common shape become one form, and a chat template
that does not show them gets them where it does (system prompt, assistant text, user turns)."""

from __future__ import annotations

import json

from pipeline import contracts, paths

import orjson
import pytest

import prepare
from fixtures import public_shapes
from helpers import error_line
from lm import chat_template, tokens
from prepare import toolcalls
from train import data as train_data

SPEC = {"name": "get_weather", "description": "weather", "parameters": {"type": "object", "properties": {}}}
OPENAI = {"type": "function", "function": SPEC}

# A ChatML template that renders tools and tool calls natively, as tool-aware model templates do.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    "given",
    [[SPEC], [OPENAI], json.dumps([SPEC]), json.dumps([OPENAI]), SPEC, json.dumps(SPEC)],
    ids=["bare-list", "openai-list", "json-string-bare", "json-string-openai", "one-object", "json-string-object"],
)
def test_every_tools_shape_becomes_openai_objects(given):
    assert toolcalls.normalize_tools(given) == [OPENAI]


@pytest.mark.parametrize(
    "given, message",
    [
        ("[{not json", "'tools' is a string that is not JSON"),
        ([{"description": "x"}], "tool 1 has no name"),
        ([{"name": "f", "parameters": {"type": "objekt"}}], "tool 'f': parameters are not a valid JSON Schema at type"),
        ([{"name": "f", "parameters": "[1]"}], "tool 'f': parameters must be a JSON Schema object"),
        ([3], "'tools' must be a list of tool definitions"),
    ],
)
def test_bad_tool_definitions_say_what_is_wrong(given, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        toolcalls.normalize_tools(given)


@pytest.mark.parametrize(
    "given",
    [
        {"name": "f", "arguments": {"a": 1}},
        {"name": "f", "arguments": '{"a": 1}'},
        {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        [{"name": "f", "parameters": {"a": 1}}],
        {"type": "function", "function": {"name": "f", "arguments": '"{\\"a\\": 1}"'}},  # encoded twice
    ],
)
def test_every_call_shape_becomes_openai_tool_calls(given):
    assert toolcalls.normalize_calls(given) == [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]


def test_a_template_without_tool_support_gets_them_in_the_prompt_and_text():
    features = {"tools": False, "tool_calls": False, "tool_results": False}
    record = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": toolcalls.normalize_calls({"name": "f", "arguments": {}}),
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
            {"role": "assistant", "content": "Sunny."},
        ],
        "tools": [OPENAI],
    }
    fitted, moved = toolcalls.fit_template(record, features)
    assert moved == {"tools", "tool_calls", "tool_results"}
    assert fitted == {
        "messages": [
            {"role": "system", "content": toolcalls.TOOLS_PREAMBLE + "\n" + json.dumps(SPEC)},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": '{"name": "f", "arguments": {}}'},
            {"role": "user", "content": toolcalls.TOOL_RESULT_PREFIX + "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    assert toolcalls.fit_template(record, dict.fromkeys(features, True)) == (record, set())


def test_template_features_are_detected_by_rendering():
    special = {"bos_token": "", "eos_token": "<|im_end|>"}
    assert chat_template.template_features({"source": TOOL_TEMPLATE}, special) == {
        "tools": True,
        "tool_calls": True,
        "tool_results": True,
    }
    chatml = chat_template.resolve_template("chatml", None)
    assert chat_template.template_features(chatml, special) == {
        "tools": False,
        "tool_calls": False,
        "tool_results": True,
    }


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return public_shapes.write_all(tmp_path_factory.mktemp("shapes"))


def prepared() -> tuple[dict, dict[str, list[dict]]]:
    contract = contracts.read_json(paths.DATA_CONTRACT, "data_contract")
    splits = {
        s: [orjson.loads(x) for x in (paths.DATA_DIR / f"{s}.jsonl").read_bytes().splitlines()] for s in prepare.SPLITS
    }
    return contract, splits


@pytest.mark.parametrize("shape", ["text_splits", "alpaca_array", "glaive_sharegpt", "openai_tools"])
def test_every_prepared_record_renders_through_the_path_train_uses(base, shapes, shape):
    """Anything prepare accepts, train accepts: every record of every split encodes, and every chat has
    trained tokens."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    assert prepare.main([f"data.source={shapes[shape]}"]) == 0
    contract, splits = prepared()
    tokenizer = load_tokenizer(
        paths.resolve(contracts.read_json(paths.MODEL_MANIFEST, "run_manifest")["outputs"][0]["path"])
    )
    for split in prepare.SPLITS:
        items = train_data.load_split(split, contract, tokenizer, mask_prompt=True)
        assert len(items) == len(splits[split]) > 0
        assert all(mask[1:].sum() > 0 for _, mask in items)


def test_glaive_function_calls_become_json_calls_the_model_sees(base, shapes):
    assert prepare.main([f"data.source={shapes['glaive_sharegpt']}"]) == 0
    contract, splits = prepared()
    records = [r for s in prepare.SPLITS for r in splits[s]]
    report = contracts.read_json(paths.DATA_DIR / "data_report.json", "data_report")
    assert report["tools"]["records_moved"] == {"tools": 160, "tool_calls": 160, "tool_results": 0}
    first = records[0]["messages"]
    assert first[0]["role"] == "system" and first[0]["content"].startswith(toolcalls.TOOLS_PREAMBLE)
    calls = [m["content"] for r in records for m in r["messages"] if m["content"].startswith('{"name"')]
    assert len(calls) == len(records) > 140 and all(
        json.loads(c)["name"] in ("get_weather", "convert_currency") for c in calls
    )
    schemas = orjson.loads(paths.resolve(contract["tool_schemas"]).read_bytes())
    assert sorted(schemas) == ["convert_currency", "get_weather"]
    assert "Tools" in (paths.DATA_DIR / "data_report.md").read_text()


def test_a_tool_aware_template_keeps_tools_structured(base, shapes, tmp_path):
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE, encoding="utf-8")
    assert prepare.main([f"data.source={shapes['openai_tools']}", f"prepare.template={template}"]) == 0
    contract, splits = prepared()
    record = splits["train"][0]
    assert record["tools"] == [
        {"type": "function", "function": public_shapes.WEATHER},
        {"type": "function", "function": public_shapes.CONVERT},
    ]
    call = next(m for m in record["messages"] if m.get("tool_calls"))
    assert isinstance(call["tool_calls"][0]["function"]["arguments"], dict)  # the API's JSON string, parsed
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(
        paths.resolve(contracts.read_json(paths.MODEL_MANIFEST, "run_manifest")["outputs"][0]["path"])
    )
    text = tokenizer.decode(tokens.encode(record, contract, tokenizer, mask_prompt=False)[0].tolist())
    assert '"name": "get_weather"' in text and "<tool_call>" in text


def test_a_bad_tool_schema_names_the_record(base, tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    bad = {**good, "tools": json.dumps([{"name": "f", "parameters": {"type": "objekt"}}])}
    path.write_text("\n".join(json.dumps(r) for r in [good] * 5 + [bad] + [good]) + "\n")
    assert prepare.main([f"data.source={path}"]) == 2
    line = error_line(caplog)
    assert f"{paths.display(path)}:6" in line and "tool 'f': parameters are not a valid JSON Schema" in line


def test_a_template_that_rewrites_earlier_turns_is_counted_and_named(base, tmp_path, caplog):
    template = tmp_path / "drops.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
        "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        encoding="utf-8",
    )
    path = tmp_path / "chats.jsonl"
    records = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"<think>thinking {i}</think>answer {i}"},
                {"role": "user", "content": "and?"},
                {"role": "assistant", "content": f"more {i}"},
            ]
            if i % 2
            else [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        }
        for i in range(40)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level("WARNING"):
        assert prepare.main([f"data.source={path}", f"prepare.template={template}"]) == 0
    report = contracts.read_json(paths.DATA_DIR / "data_report.json", "data_report")
    assert sum(report["splits"][s]["last_turn_only"] for s in prepare.SPLITS) == 20
    warning = next(r.getMessage() for r in caplog.records if "last assistant turn only" in r.getMessage())
    assert f"{paths.display(path)}:" in warning and "assistant turn 1 of 2" in warning
