"""The Ollama Modelfile: Go TEMPLATE derived from the Jinja chat template, SYSTEM, stops, quoting."""

from __future__ import annotations

import re

from pipeline.errors import PipelineError

import pytest

from helpers import REPO
from lm import ollama as oe

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEMPLATES = {
    name: (REPO / "config" / "templates" / f"{name}.jinja").read_text() for name in ("chatml", "alpaca", "llama-3")
}
TEMPLATES["smollm2"] = SMOLLM2
EOS = {"chatml": "<|im_end|>", "alpaca": "</s>", "llama-3": "<|eot_id|>", "smollm2": "<|im_end|>"}

THREE_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?\nShow your work."},
    {"role": "assistant", "content": "6, because 3+3=6."},
    {"role": "user", "content": "Thanks!"},
]


def exported(name: str, **special):
    spec = oe.infer_template_spec(TEMPLATES[name], eos_token=EOS[name], **special)
    return spec, oe.go_template(spec)


def jinja(name: str, messages: list[dict], **special) -> str:
    return oe.render_jinja(TEMPLATES[name], messages, add_generation_prompt=True, eos_token=EOS[name], **special)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_go_template_renders_three_turns_like_jinja(name):
    spec, go = exported(name)
    assert oe.render_go(go, THREE_TURNS, spec.default_system) == jinja(name, THREE_TURNS)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_modelfile_system_stands_in_for_the_templates_default(name):
    """Ollama inserts SYSTEM as the first message; that must equal Jinja on the messages without it."""
    spec, go = exported(name)
    assert oe.render_go(go, THREE_TURNS[1:], spec.default_system) == jinja(name, THREE_TURNS[1:])


WITH_TOOL_RESULT = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
    {"role": "tool", "content": '{"temperature": -3}'},
    {"role": "assistant", "content": "It is -3 degrees."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.mark.parametrize("name", ["chatml", "llama-3", "smollm2"])
def test_tool_results_render_like_jinja_where_the_template_writes_them(name):
    spec, go = exported(name)
    assert "tool" in spec.prefixes
    assert oe.render_go(go, WITH_TOOL_RESULT, spec.default_system) == jinja(name, WITH_TOOL_RESULT)
    assert oe.render_go(go, WITH_TOOL_RESULT[:3], spec.default_system) == jinja(name, WITH_TOOL_RESULT[:3])


def test_a_template_without_tool_messages_has_no_tool_branch():
    spec, go = exported("alpaca")  # prepare moves tool results into the user turn for such templates
    assert "tool" not in spec.prefixes and '"tool"' not in go


def test_chatml_prompt_is_exactly_the_chatml_text():
    _, go = exported("chatml")
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?\nShow your work.<|im_end|>\n"
        "<|im_start|>assistant\n6, because "
        "3+3=6.<|im_end|>\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert oe.render_go(go, THREE_TURNS, None) == expected


def test_smollm2_default_system_becomes_the_system_line_not_template_text():
    spec, go = exported("smollm2")
    assert spec.default_system == SMOLLM2_SYSTEM
    assert "SmolLM" not in go
    assert (
        oe.render_go(go, THREE_TURNS[1:2], None) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert oe.infer_template_spec(TEMPLATES["chatml"]).default_system is None


def test_spec_pieces_for_alpaca_and_llama3():
    alpaca, _ = exported("alpaca")
    assert (alpaca.prefixes, alpaca.suffixes, alpaca.generation_prompt) == (
        {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"},
        {"system": "\n\n", "user": "\n\n", "assistant": "</s>\n\n"},
        "### Response:\n",
    )
    llama, _ = exported("llama-3", bos_token="<|begin_of_text|>")
    assert llama.leading == "<|begin_of_text|>"
    assert llama.suffixes == {
        "system": "<|eot_id|>",
        "user": "<|eot_id|>",
        "assistant": "<|eot_id|>",
        "tool": "<|eot_id|>",
    }
    assert llama.prefixes["tool"] == "<|start_header_id|>tool<|end_header_id|>\n\n"


def test_bos_is_left_out_unless_given():
    assert exported("llama-3")[0].leading == ""
    spec, go = exported("llama-3", bos_token="<|begin_of_text|>")
    assert oe.render_go(go, THREE_TURNS, None).startswith("<|begin_of_text|><|start_header_id|>system")
    oe.check_modelfile_template(
        TEMPLATES["llama-3"], go, None, [THREE_TURNS], bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )


def test_last_assistant_message_is_left_open_for_ollama_to_continue():
    _, go = exported("chatml")
    prefill = [THREE_TURNS[1], {"role": "assistant", "content": "The answer is"}]
    assert oe.render_go(go, prefill, None).endswith("<|im_start|>assistant\nThe answer is")
    oe.check_modelfile_template(TEMPLATES["chatml"], go, None, [prefill, THREE_TURNS])


def test_render_go_merges_consecutive_messages_like_ollama():
    _, go = exported("chatml")
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert oe.render_go(go, messages, None) == "<|im_start|>user\na\n\nb<|im_end|>\n<|im_start|>assistant\n"


def test_template_like_content_is_rendered_verbatim():
    _, go = exported("chatml")
    tricky = [{"role": "user", "content": '{{ .System }} {{- end }} """ \\n'}]
    assert oe.render_go(go, tricky, None) == jinja("chatml", tricky)


def test_check_names_the_first_differing_character():
    _, go = exported("chatml")
    tampered = go.replace('"<|im_end|>\\n"', '"<|im_end|> \\n"', 1)
    assert tampered != go
    position = len("<|im_start|>system\nBe brief.<|im_end|>")
    with pytest.raises(PipelineError, match=f"character {position}"):
        oe.check_modelfile_template(TEMPLATES["chatml"], tampered, None, [THREE_TURNS])


def test_check_fails_when_the_default_system_prompt_is_dropped():
    spec, go = exported("smollm2")
    oe.check_modelfile_template(
        SMOLLM2, go, spec.default_system, [THREE_TURNS, THREE_TURNS[1:]], eos_token="<|im_end|>"
    )
    with pytest.raises(PipelineError, match="differently") as error:
        oe.check_modelfile_template(SMOLLM2, go, None, [THREE_TURNS[1:]], eos_token="<|im_end|>")
    assert "package.ollama.system" in error.value.fix


@pytest.mark.parametrize(
    "name, eos, expected",
    [
        ("chatml", "<|im_end|>", ["<|im_end|>", "<|im_start|>"]),
        ("smollm2", "<|im_end|>", ["<|im_end|>", "<|im_start|>"]),
        ("llama-3", "<|end_of_text|>", ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"]),
        ("alpaca", "</s>", ["</s>", "### Instruction:"]),
    ],
)
def test_stop_tokens(name, eos, expected):
    assert oe.stop_tokens(exported(name)[0], eos) == expected


def test_stop_tokens_without_special_tokens_use_the_next_turns_first_line():
    spec = oe.infer_template_spec(TEMPLATES["alpaca"], eos_token="")
    assert oe.stop_tokens(spec, None) == ["### Instruction:"]


def test_a_template_that_writes_eos_needs_it():
    with pytest.raises(PipelineError, match="eos_token"):
        oe.infer_template_spec(TEMPLATES["alpaca"])


# --- the Modelfile -------------------------------------------------------------------------------

VALUE = re.compile(r'"""(.*?)"""(?=\s|$)|"([^"]*)"(?=\s|$)|([^\s"]\S*)', re.S)


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs, read as Ollama's parser reads them: quoted values verbatim, no escapes."""
    commands, rest = [], text
    while rest := rest.lstrip():
        if rest.startswith("#"):
            rest = rest.partition("\n")[2]
            continue
        name, rest = re.match(r"([A-Za-z]+)[ \t]+(.*)", rest, re.S).groups()
        if name == "PARAMETER":
            name, rest = re.match(r"(\w+)[ \t]+(.*)", rest, re.S).groups()
        value = VALUE.match(rest)
        assert value, f"unparseable value for {name}: {rest[:40]!r}"
        commands.append((name.lower(), next(g for g in value.groups() if g is not None)))
        rest = rest[value.end() :]
    return commands


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_modelfile_parses_back(name):
    spec, go = exported(name)
    stops = oe.stop_tokens(spec, EOS[name])
    text = oe.modelfile_text(
        "main-Q4_K_M.gguf", spec, stops=stops, num_ctx=4096, system=spec.default_system, parameters={"temperature": 0}
    )
    expected = [("from", "./main-Q4_K_M.gguf"), ("template", go)]
    expected += [("system", spec.default_system)] if spec.default_system else []
    expected += [("stop", s) for s in stops] + [("num_ctx", "4096"), ("temperature", "0")]
    assert parse_modelfile(text) == expected
    assert '\nTEMPLATE """{{-' in text and "\nPARAMETER num_ctx 4096\n" in text


def test_modelfile_quotes_awkward_values():
    spec, _ = exported("chatml")
    stops = ['say "hi"', "\n\nUser:", "<|im_end|>"]
    text = oe.modelfile_text(
        "my model.gguf", spec, stops=stops, num_ctx=8, system='Say "yes"', parameters={"top_k": 40, "penalize": True}
    )
    commands = parse_modelfile(text)
    assert commands[0] == ("from", "./my model.gguf")
    assert ("system", 'Say "yes"') in commands
    assert [v for k, v in commands if k == "stop"] == stops
    assert commands[-2:] == [("top_k", "40"), ("penalize", "true")]


@pytest.mark.parametrize("system", ['He said """no"""', "bell\x07"])
def test_modelfile_refuses_text_it_cannot_quote(system):
    spec, _ = exported("chatml")
    with pytest.raises(PipelineError, match="cannot carry"):
        oe.modelfile_text("m.gguf", spec, stops=[], num_ctx=8, system=system)


# --- templates that are not per-message blocks ---------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
        "{% for m in messages | sort(attribute='role') %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] "
        "}}>{% endfor %}",
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | upper }}{% endfor %}",
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}",
        "{{ messages[-1]['content'] }}",
    ],
    ids=["index-numbers", "sorted-roles", "uppercased", "marks-last", "last-only"],
)
def test_inexpressible_templates_are_refused(template):
    with pytest.raises(PipelineError, match="cannot be written as an Ollama template") as error:
        oe.infer_template_spec(template)
    assert error.value.where == "prepare.template" and "chatml" in error.value.fix
