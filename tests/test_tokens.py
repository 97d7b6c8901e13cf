"""lm.tokens and lm.chat_template: the one renderer gives the token ids transformers gives, and
the scripts/ packages never shadow an installed distribution."""

from __future__ import annotations

import importlib.metadata

from mlx_lm.tokenizer_utils import load as load_tokenizer

from helpers import REPO
from lm import chat_template, tokens

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
