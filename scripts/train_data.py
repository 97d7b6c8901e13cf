"""train, part 1: tokens with a per-token loss mask, a resumable batch order, and the masked loss.

Every assistant turn of a chat is trained and every system/user/tool turn is masked (mlx-lm's
`mask_prompt` trains only the last message). The batch for global step s depends only on the seed
and s, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from pipeline import paths
from pipeline.errors import PipelineError


def load_split(path: Path, contract: dict, tokenizer, mask_prompt: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(token ids, loss mask)] for every record of a prepared split."""
    if contract["template"]["origin"] != "model":
        tokenizer.chat_template = contract["template"]["source"]  # the contract's template is the one trained with
    fmt = contract["format"]
    items = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        record = orjson.loads(line)
        try:
            items.append(encode(record, fmt, tokenizer, mask_prompt))
        except Exception as exc:  # a template error names the record
            raise PipelineError(f"cannot tokenize the record: {exc}", where=f"{paths.display(path)}:{line_no}", fix="re-run `make prepare`; check prepare.template") from None
    return items


def encode(record: dict, fmt: str, tokenizer, mask_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    if fmt == "text":
        ids = tokenizer.encode(record["text"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return np.array(ids, np.int32), np.ones(len(ids), np.float32)
    if fmt == "completions":
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
        return encode_chat(tokenizer, messages, None, mask_prompt)
    return encode_chat(tokenizer, record["messages"], record.get("tools"), mask_prompt)


def encode_chat(tokenizer, messages: list[dict], tools, mask_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    def render(msgs, generation_prompt=False):
        if not msgs:
            return []
        return list(tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False))

    ids = render(messages)
    mask = np.zeros(len(ids), np.float32)
    if not mask_prompt:
        mask[:] = 1
        return np.array(ids, np.int32), mask
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], generation_prompt=True)), len(render(messages[: i + 1]))
        mask[start:end] = 1
    return np.array(ids, np.int32), mask


def prompt_and_reference(record: dict, fmt: str, tokenizer) -> tuple[list[int], str]:
    """What a model is asked (token ids, generation prompt included) and the answer the data expects.

    Chats are cut before their last assistant turn; text records at half their tokens.
    """
    if fmt == "text":
        ids = tokenizer.encode(record["text"])
        cut = max(1, len(ids) // 2)
        return ids[:cut], tokenizer.decode(ids[cut:])
    if fmt == "completions":
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    else:
        messages = record["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    reference = messages[last]["content"] if last < len(messages) else ""
    ids = tokenizer.apply_chat_template(messages[:last], tools=record.get("tools"), add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids), reference


def masked_loss(model, inputs, targets, mask):
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(inputs)
    ce = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


class BatchOrder:
    """Length-sorted batches, shuffled per epoch with (seed, epoch): batch(s) is a pure function of s."""

    def __init__(self, items: list[tuple[np.ndarray, np.ndarray]], batch_size: int, seed: int):
        self.items, self.batch_size, self.seed = items, batch_size, seed
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
        self.batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]

    def indices(self, step: int) -> list[int]:
        epoch, position = divmod(step, len(self.batches))
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))
        return self.batches[permutation[position]]

    def batch(self, step: int, max_seq_length: int):
        return pad([self.items[i] for i in self.indices(step)], max_seq_length)


def pad(items, max_seq_length: int):
    """(inputs, targets, target mask) as mx arrays, padded to a multiple of 8 and cut at max_seq_length."""
    import mlx.core as mx

    longest = min(max(len(ids) for ids, _ in items), max_seq_length)
    width = min(max_seq_length, 8 * ((longest + 7) // 8))
    tokens = np.zeros((len(items), width), np.int32)
    masks = np.zeros((len(items), width), np.float32)
    for row, (ids, mask) in enumerate(items):
        n = min(len(ids), width)
        tokens[row, :n], masks[row, :n] = ids[:n], mask[:n]
    return mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(masks[:, 1:])


def validation_loss(model, items, batch_size: int, val_batches: int, max_seq_length: int) -> float:
    """Token-weighted mean loss over the first `val_batches` batches in fixed order (-1: all)."""
    import mlx.core as mx

    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if val_batches != -1:
        batches = batches[:val_batches]
    total, count = mx.array(0.0), mx.array(0.0)
    for batch in batches:
        loss, ntoks = masked_loss(model, *pad([items[i] for i in batch], max_seq_length))
        total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
    return (total / count).item()
