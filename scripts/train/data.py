"""train's data: the prepared splits as (token ids, loss mask) items, a resumable batch order, and the
masked loss. The batch for global step s depends only on the seed and s, so a resumed run sees exactly
the batches an uninterrupted one would.

Where the model splits into body and head (lm.heads), a batch is (inputs, trained positions, their
targets, their weights) and the output layer runs at the trained positions only (trained_loss); any
other model gets (inputs, targets, mask) and every position's logits (masked_loss). Both give the
same loss up to float rounding (tested).
"""

from __future__ import annotations

import dataclasses
import functools

from pipeline import splits
from pipeline.errors import PipelineError

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lm import heads, tokens


@dataclasses.dataclass
class Splits:
    """The train and validation items (token ids, loss mask) and the length they are cut at."""

    train: list[tuple[np.ndarray, np.ndarray]]
    valid: list[tuple[np.ndarray, np.ndarray]]
    max_seq_length: int


def load_split(split: str, contract: dict, tokenizer, mask_prompt: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(token ids, loss mask)] for every record of a prepared split."""
    items = []
    for number, record in enumerate(splits.read_split(contract, split), 1):
        try:
            items.append(tokens.encode(record, contract, tokenizer, mask_prompt))
        except PipelineError as exc:  # a template error: name the record
            where = f"{contract['splits'][split]} record {number}"
            raise PipelineError(exc.what, where=where, fix="re-run `make prepare`; check prepare.template") from exc
    return items


def masked_loss(model, inputs, targets, mask):
    logits = model(inputs)
    ce = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


def trained_loss(model, inputs, positions, targets, weights, body=None):
    """masked_loss, with the output layer and the cross-entropy at the trained positions only; `body`
    (train.prefix) in place of the model's own body."""
    own_body, head = heads.split(model)
    hidden = (body or own_body)(inputs)
    selected = hidden.reshape(-1, hidden.shape[-1])[positions]
    ce = nn.losses.cross_entropy(head(selected), targets) * weights
    ntoks = weights.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


def loss_for(model, body=None):
    """The loss function a batch of `batch_arrays(model, ...)` goes with; with `body` (train.prefix.body),
    the trained loss through it."""
    if heads.split(model) is None:
        return masked_loss
    return trained_loss if body is None else functools.partial(trained_loss, body=body)


def batch_arrays(model, items, max_seq_length: int) -> tuple:
    """The arrays loss_for(model) takes, for these items."""
    inputs, targets, mask = pad_numpy(items, max_seq_length)
    if heads.split(model) is None:
        return mx.array(inputs), mx.array(targets), mx.array(mask)
    return (mx.array(inputs), *trained_positions(targets, mask))


def trained_positions(targets: np.ndarray, mask: np.ndarray) -> tuple[mx.array, mx.array, mx.array]:
    """(positions in the flattened batch, their targets, their weights) of the trained tokens, padded
    with weight-0 entries to a multiple of 8, so that a few shapes cover every batch (mx.compile)."""
    flat_mask = mask.reshape(-1)
    trained = np.flatnonzero(flat_mask > 0)
    count = 8 * max(1, (len(trained) + 7) // 8)
    positions = np.zeros(count, np.int32)
    positions[: len(trained)] = trained
    weights = np.zeros(count, np.float32)
    weights[: len(trained)] = flat_mask[trained]
    return mx.array(positions), mx.array(targets.reshape(-1)[positions]), mx.array(weights)


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

    def batch_for(self, model, step: int, max_seq_length: int, share=None) -> tuple:
        """The batch of `step` as the arrays loss_for(model) takes; with `share` (a distributed run), the
        part of it share(indices) gives this rank."""
        indices = self.indices(step) if share is None else share(self.indices(step))
        return batch_arrays(model, [self.items[i] for i in indices], max_seq_length)


def pad(items, max_seq_length: int):
    """(inputs, targets, target mask) as mx arrays, padded to a multiple of 8 and cut at max_seq_length."""
    return tuple(mx.array(a) for a in pad_numpy(items, max_seq_length))


def pad_numpy(items, max_seq_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pad's arrays, in numpy."""
    longest = min(max(len(ids) for ids, _ in items), max_seq_length)
    width = min(max_seq_length, 8 * ((longest + 7) // 8))
    tokens = np.zeros((len(items), width), np.int32)
    masks = np.zeros((len(items), width), np.float32)
    for row, (ids, mask) in enumerate(items):
        n = min(len(ids), width)
        tokens[row, :n], masks[row, :n] = ids[:n], mask[:n]
    return tokens[:, :-1], tokens[:, 1:], masks[:, 1:]


def validation_loss(
    model, items, batch_size: int, val_batches: int, max_seq_length: int, share=None, group=None, body=None
) -> float:
    """Token-weighted mean loss over the first `val_batches` batches in fixed order (-1: all). In a
    distributed run each rank scores share(batch) of every batch and `group` sums the ranks' totals.
    `body`: as in loss_for."""
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if val_batches != -1:
        batches = batches[:val_batches]
    total, count = mx.array(0.0), mx.array(0.0)
    for batch in batches:
        part = batch if share is None else share(batch)
        loss, ntoks = loss_for(model, body)(model, *batch_arrays(model, [items[i] for i in part], max_seq_length))
        total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
        if group is not None:
            group.alive()
    if group is not None and group.size > 1:
        total, count = group.all_sum(total), group.all_sum(count)
    return (total / count).item()
