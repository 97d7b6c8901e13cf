"""Records of the prepared splits as tokens: ids with a per-token loss mask (train, eval's loss,
quantize's perplexity), and what a model is asked with the answer the data expects (eval's answers,
quantize's export check, fuse's logits check). Chats are rendered by lm.chat_template with the
template of the data contract, so every stage sees the same text.

Every assistant turn of a chat is scored and every system/user/tool turn is masked (mlx-lm's
`mask_prompt` trains only the last message).
"""

from __future__ import annotations

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


def encode(record: dict, contract: dict, tokenizer, mask_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss mask) of a prepared record."""
    fmt = contract["format"]
    if fmt == "text":
        ids = tokenizer.encode(record["text"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return np.array(ids, np.int32), np.ones(len(ids), np.float32)
    messages = completion_messages(record) if fmt == "completions" else record["messages"]
    return encode_chat(tokenizer, contract["template"], messages, record.get("tools"), mask_prompt)


def encode_chat(tokenizer, template: dict, messages: list[dict], tools, mask_prompt: bool):
    ids = chat_ids(tokenizer, template, messages, tools)
    mask = np.zeros(len(ids), np.float32)
    if not mask_prompt:
        mask[:] = 1
        return np.array(ids, np.int32), mask
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(chat_ids(tokenizer, template, messages[:i], tools, add_generation_prompt=True))
        end = len(chat_ids(tokenizer, template, messages[: i + 1], tools))
        mask[start:end] = 1
    return np.array(ids, np.int32), mask


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
    reference = messages[last]["content"] if last < len(messages) else ""
    ids = chat_ids(tokenizer, contract["template"], messages[:last], record.get("tools"), add_generation_prompt=True)
    return ids, reference


def check_prompts(contract: dict, tokenizer, count: int) -> list[list[int]]:
    """The first `count` test prompts as token ids: what fuse and quantize check their outputs on."""
    return [prompt_and_reference(r, contract, tokenizer)[0] for r in splits.read_split(contract, "test", count)]
