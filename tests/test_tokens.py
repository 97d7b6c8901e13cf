"""lm.tokens and lm.chat_template: the one renderer gives the token ids transformers gives, and
the scripts/ packages never shadow an installed distribution."""

from __future__ import annotations

import importlib.metadata

from mlx_lm.tokenizer_utils import load as load_tokenizer

from helpers import REPO
from lm import chat_template, tokens
from prepare import toolcalls_dataset

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_chat_ids_equal_the_tokenizers_own_chat_template(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    template = {"id": "model", "source": tokenizer.chat_template}
    for messages, prompt in ((CHAT, False), (CHAT[:2], True), (CHAT[:4], True)):
        theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True, return_dict=False)
        assert tokens.chat_ids(tokenizer, template, messages, add_generation_prompt=prompt) == list(theirs)


def test_prompt_and_reference_cut_before_the_last_answer(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    contract = {"format": "messages", "template": {"id": "model", "source": tokenizer.chat_template}}
    ids, reference = tokens.prompt_and_reference({"messages": CHAT}, contract, tokenizer)
    assert reference == "6"
    assert tokenizer.decode(ids).endswith("And 3+3?<|im_end|>\n<|im_start|>assistant\n")


def test_none_valued_keys_are_dropped_as_transformers_does():
    source = "{% for m in messages %}{{ m.role }}{% if m.name is defined %}({{ m.name }}){% endif %};{% endfor %}"
    text = chat_template.render(source, [{"role": "user", "content": "x", "name": None}])
    assert text == "user;"


def test_no_package_of_scripts_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    ours = [p.name for p in (REPO / "scripts").iterdir() if (p / "__init__.py").is_file()]
    ours += [p.stem for p in (REPO / "scripts").glob("*.py")]
    clashes = {name: installed[name] for name in ours if name in installed}
    assert not clashes, f"scripts/ modules shadow installed packages: {clashes}"


# A template that rewrites earlier turns, as reasoning models' templates do: a past assistant turn
# loses its <think>…</think> part, the last one keeps it.
DROPS_PAST_REASONING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _trained_text(tokenizer, ids, mask) -> list[str]:
    """The trained stretches of a masked record, decoded."""
    stretches, current = [], []
    for token, weight in zip(ids.tolist(), mask.tolist()):
        if weight:
            current.append(token)
        elif current:
            stretches.append(tokenizer.decode(current))
            current = []
    return stretches + ([tokenizer.decode(current)] if current else [])


def test_every_assistant_turn_is_trained_with_its_end_of_turn_token(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    template = {"id": "model", "source": tokenizer.chat_template}
    notes = []
    ids, mask = tokens.encode_chat(tokenizer, template, CHAT, None, mask_prompt=True, notes=notes)
    assert _trained_text(tokenizer, ids, mask) == ["4<|im_end|>\n", "6<|im_end|>\n"]
    assert notes == []


def test_a_template_that_rewrites_earlier_turns_trains_only_the_last_turn(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    template = {"id": "drops-reasoning", "source": DROPS_PAST_REASONING}
    chat = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>two and two</think>4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>three and three</think>6"},
    ]
    notes = []
    ids, mask = tokens.encode_chat(tokenizer, template, chat, None, mask_prompt=True, notes=notes)
    assert _trained_text(tokenizer, ids, mask) == ["<think>three and three</think>6<|im_end|>\n"]
    assert len(notes) == 1 and "assistant turn 1 of 2" in notes[0]
    whole = tokenizer.decode(ids.tolist())
    assert "two and two" not in whole  # what is trained is the whole conversation as the template renders it


def test_the_mask_check_passes_on_every_builtin_record(tiny_model_dir):
    """The builtin dataset keeps its masks: no record falls back to its last turn."""
    tokenizer = load_tokenizer(tiny_model_dir)
    template = {"id": "model", "source": tokenizer.chat_template}
    records = [r for split in toolcalls_dataset.generate(seed=0).values() for r in split]
    notes = [tokens.assistant_spans(tokenizer, template, r["messages"], None)[2] for r in records[:200]]
    assert notes == [None] * len(notes)
