"""Records of the prepared splits as tokens: ids with a per-token loss mask (train, eval's loss,
quantize's perplexity), and what a model is asked with the answer the data expects (eval's answers,
quantize's export check, fuse's logits check). Chats are rendered by lm.chat_template with the
template of the data contract, so every stage sees the same text.

Every assistant turn of a chat is scored, its end-of-turn tokens included, and every
system/user/tool turn is masked (mlx-lm's `mask_prompt` trains only the last message). Turns are
found by rendering the conversation's first messages, which is checked, record by record, to give a
prefix of the whole; where a template breaks that, only the last assistant turn is trained.
"""

from __future__ import annotations

import bisect
import json
import os

from pipeline import splits

import numpy as np

from lm import chat_template


def completion_messages(record: dict) -> list[dict]:
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def chat_ids(tokenizer, template: dict, messages: list[dict], tools=None, add_generation_prompt=False) -> list[int]:
    """The token ids of a conversation rendered with `template` (no BOS/EOS added beyond the template's)."""
    if not messages:
        return []
    special = chat_template.special_tokens(tokenizer)
    text = chat_template.render_chat(
        template, messages, special, tools=tools, add_generation_prompt=add_generation_prompt
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode(
    record: dict, contract: dict, tokenizer, mask_prompt: bool, notes: list | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss mask) of a prepared record; a chat whose turns cannot all be masked apart
    (see assistant_spans) appends why to `notes`."""
    fmt = contract["format"]
    if fmt == "text":
        ids = tokenizer.encode(record["text"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return np.array(ids, np.int32), np.ones(len(ids), np.float32)
    messages = completion_messages(record) if fmt == "completions" else record["messages"]
    return encode_chat(tokenizer, contract["template"], messages, record.get("tools"), mask_prompt, notes)


def encode_chat(tokenizer, template: dict, messages: list[dict], tools, mask_prompt: bool, notes=None):
    if not mask_prompt:
        ids = chat_ids(tokenizer, template, messages, tools)
        return np.array(ids, np.int32), np.ones(len(ids), np.float32)
    ids, spans, note = assistant_spans(tokenizer, template, messages, tools)
    if note and notes is not None:
        notes.append(note)
    mask = np.zeros(len(ids), np.float32)
    for start, end in spans:
        mask[start:end] = 1
    return np.array(ids, np.int32), mask


def assistant_spans(tokenizer, template: dict, messages: list[dict], tools) -> tuple[list[int], list, str | None]:
    """The conversation's token ids, the [start, end) token span of each assistant turn (its
    end-of-turn tokens included, so the model learns to stop), and None; or, when the template
    renders some turn differently inside the whole conversation than at the end of its first
    messages (templates that rewrite earlier turns, e.g. drop past reasoning), only the last
    assistant turn's span and a note saying which turn broke the prefix."""
    texts = turn_texts(template, messages, tools, chat_template.special_tokens(tokenizer))
    return spans_in(texts, encode_with_offsets(tokenizer, texts[:1])[0])


def turn_texts(template: dict, messages: list[dict], tools, special: dict, whole: str | None = None) -> list[str]:
    """[the whole conversation (`whole`, when already rendered), then per assistant turn: the text
    before it (generation prompt included) and the text through it], each rendered on its own."""
    whole = chat_template.render_chat(template, messages, special, tools=tools) if whole is None else whole
    texts = [whole]
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            texts.append(chat_template.render_chat(template, messages[:i], special, tools, add_generation_prompt=True))
            last = i == len(messages) - 1  # through the last message is the whole conversation
            texts.append(whole if last else chat_template.render_chat(template, messages[: i + 1], special, tools))
    return texts


def encode_with_offsets(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """Each text's token ids and the character offset where each token starts (the fast tokenizer's
    batch encoder; no special tokens added beyond the text's own)."""
    fast = getattr(getattr(tokenizer, "_tokenizer", tokenizer), "_tokenizer", None)
    if fast is None or not hasattr(fast, "encode_batch"):
        return [_offsets_by_prefixes(tokenizer, text) for text in texts]
    out = []
    for first in range(0, len(texts), 4096):
        for encoding in fast.encode_batch(texts[first : first + 4096], add_special_tokens=False):
            out.append((encoding.ids, [start for start, _ in encoding.offsets]))
    return out


def _offsets_by_prefixes(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token start offsets without a fast tokenizer: the length of the decoded text before each token."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ids, [len(tokenizer.decode(ids[:k])) for k in range(len(ids))]


def spans_in(texts: list[str], encoded: tuple[list[int], list[int]]) -> tuple[list[int], list, str | None]:
    """assistant_spans' answer from turn_texts() and the whole conversation's encoding: a turn's span
    runs from the token where the text before it ends to the token where the text through it ends;
    both must be prefixes of the whole text that end on a token boundary."""
    whole, (ids, starts) = texts[0], encoded
    pairs = [(texts[k], texts[k + 1]) for k in range(1, len(texts), 2)]
    spans = []
    for turn, (before, through) in enumerate(pairs, 1):
        start, end = _boundary(whole, starts, before), _boundary(whole, starts, through)
        if start is None or end is None:
            note = (
                f"assistant turn {turn} of {len(pairs)} does not render as a prefix of the whole conversation "
                "with this template: only the last assistant turn is trained"
            )
            return ids, [_last_turn_span(whole, starts, *pairs[-1])], note
        spans.append((start, end))
    return ids, spans, None


def _boundary(whole: str, starts: list[int], prefix: str) -> int | None:
    """The index of the first token after `prefix` in `whole`, or None when `prefix` is not a prefix of
    `whole` that ends where a token starts."""
    if not whole.startswith(prefix):
        return None
    index = bisect.bisect_left(starts, len(prefix))
    return index if index == len(starts) or starts[index] == len(prefix) else None


def _last_turn_span(whole: str, starts: list[int], before: str, through: str) -> tuple[int, int]:
    """The last turn's tokens: from where its text starts (as far as the whole agrees) to the end."""
    start = len(os.path.commonprefix([whole, before]))
    end = len(whole) if through == whole else len(os.path.commonprefix([whole, through]))
    return bisect.bisect_left(starts, start), bisect.bisect_left(starts, end)


def prompt_and_reference(record: dict, contract: dict, tokenizer) -> tuple[list[int], str]:
    """What a model is asked (token ids, generation prompt included) and the answer the data expects.

    Chats are cut before their last assistant turn; text records at half their tokens.
    """
    fmt = contract["format"]
    if fmt == "text":
        ids = tokenizer.encode(record["text"])
        cut = max(1, len(ids) // 2)
        return ids[:cut], tokenizer.decode(ids[cut:])
    messages = completion_messages(record) if fmt == "completions" else record["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    reference = answer_text(messages[last]) if last < len(messages) else ""
    ids = chat_ids(tokenizer, contract["template"], messages[:last], record.get("tools"), add_generation_prompt=True)
    return ids, reference


def answer_text(message: dict) -> str:
    """What an assistant turn answers: its text, or its tool calls as one {"name", "arguments"} JSON
    object per line (the form prepare writes calls in for templates that do not render them)."""
    calls = message.get("tool_calls")
    if not calls:
        return message["content"]
    lines = [
        json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
        for c in calls
    ]
    return "\n".join([message["content"], *lines] if message["content"].strip() else lines)


def check_prompts(contract: dict, tokenizer, count: int) -> list[list[int]]:
    """The first `count` test prompts as token ids: what fuse and quantize check their outputs on."""
    return [prompt_and_reference(r, contract, tokenizer)[0] for r in splits.read_split(contract, "test", count)]
