"""Batched decoding in MLX with the prompts' shared prefix kept once (cascade attention).

Every prompt of a test split usually starts with the same system prompt; on the default data (eight
tool schemas) it is most of each prompt. mlx-lm's batch_generate keeps a copy of that prefix per row in
its BatchKVCache, so each decoding step reads every copy, and dropping a finished row copies them all.
Here the prefix's keys and values are held once per layer ([1, kv_heads, P, head_dim]) and each row's
own tokens in a small left-padded cache. Attention is computed in two parts and merged by their
log-sum-exp: the queries of every row against the prefix as one matrix product, and each row against
its own tokens. That equals attention over the whole row up to float rounding.

`supported(model)`: models whose module calls mlx-lm's scaled_dot_product_attention under that name and
whose layers all use a plain KVCache (llama, qwen2, mistral and most others). Within `decoding(model)`
that function handles a SharedPrefixCache and passes anything else on unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, make_prompt_cache

from lm import cpu_activations, fast_exp

# Rows dropped from the caches once this share of them has finished: a finished row costs little in the
# matrix products (the weights are read once for all rows), and dropping rows copies every row's cache.
COMPACT_WHEN_DONE = 0.25


class SharedPrefixCache:
    """One layer's cache for a batch of rows that share a prefix, held once as batch-1 keys and values;
    each row's own tokens are left-padded, as in mlx-lm's BatchKVCache, and `offset` is each row's next
    position counting the prefix."""

    step = 64

    def __init__(self, prefix_keys, prefix_values, keys, values, left_padding: list[int]):
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.prefix_length = 0 if prefix_keys is None else prefix_keys.shape[2]
        self.keys, self.values = keys, values
        self._idx = 0 if keys is None else keys.shape[2]
        self.left_padding = mx.array(left_padding)
        self.offset = self.prefix_length + self._idx - self.left_padding

    def update_and_fetch(self, keys, values):
        previous, length = self._idx, keys.shape[2]
        if self.keys is None or previous + length > self.keys.shape[2]:
            grow = self.step * ((length + self.step - 1) // self.step)
            extra_k = mx.zeros((*keys.shape[:2], grow, keys.shape[3]), keys.dtype)
            extra_v = mx.zeros((*values.shape[:2], grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = extra_k, extra_v
            else:
                self.keys = mx.concatenate([self.keys[..., :previous, :], extra_k], axis=2)
                self.values = mx.concatenate([self.values[..., :previous, :], extra_v], axis=2)
        self._idx += length
        self.offset = self.offset + length
        self.keys[..., previous : self._idx, :] = keys
        self.values[..., previous : self._idx, :] = values
        return self.keys[..., : self._idx, :], self.values[..., : self._idx, :]

    def make_mask(self, length: int, return_array: bool = False, window_size=None, **kwargs):
        """Causal over each row's own tokens, left padding masked; the prefix is seen by every query."""
        return create_causal_mask(length, offset=self._idx, left_padding=self.left_padding)

    def filter(self, rows: list[int]) -> None:
        """Keep only `rows`, in that order."""
        index = mx.array(rows)
        self.keys, self.values = self.keys[index], self.values[index]
        self.offset, self.left_padding = self.offset[index], self.left_padding[index]
        unused = min(self.left_padding.tolist())
        if unused > 0:
            self.keys, self.values = self.keys[..., unused:, :], self.values[..., unused:, :]
            self._idx -= unused
            self.left_padding = self.left_padding - unused


def supported(model) -> bool:
    """Whether `decoding(model)` can route the model's attention through a SharedPrefixCache."""
    module = sys.modules[type(model).__module__]
    plain_caches = all(type(c) is KVCache for c in make_prompt_cache(model))
    return plain_caches and callable(getattr(module, "scaled_dot_product_attention", None))


def decoding(model):
    """Within the block, the model's attention handles SharedPrefixCache layers (and passes any other
    cache to what it called before: mlx-lm's function, or a swap already in place)."""
    return cpu_activations.swapped_activations(model, attention, _unchanged)


def _unchanged(*args, fallback, **kwargs):
    return fallback(*args, **kwargs)


def attention(queries, keys, values, cache, scale: float, mask, sinks=None, *, fallback):
    """Attention of each row's queries over the shared prefix and its own tokens (`keys`, `values`)."""
    if not isinstance(cache, SharedPrefixCache) or sinks is not None:
        return fallback(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    batch, heads, length, depth = queries.shape
    kv_heads = keys.shape[1]
    repeats = heads // kv_heads
    # Query head h reads key head h // repeats, so the heads of one key head stack as rows.
    grouped = (queries * scale).reshape(batch, kv_heads, repeats * length, depth)
    own = grouped @ keys.swapaxes(-1, -2)
    if mask is not None:
        shaped = own.reshape(batch, kv_heads, repeats, length, own.shape[-1])
        own = mx.where(mask[:, :, None], shaped, -mx.inf).reshape(own.shape)
    parts = [_partial(own, values)]
    if cache.prefix_length:
        # Every row's queries as the rows of one product with the prefix, read once.
        stacked = grouped.transpose(1, 0, 2, 3).reshape(1, kv_heads, batch * repeats * length, depth)
        scores = stacked @ cache.prefix_keys.swapaxes(-1, -2)
        parts.append(
            tuple(
                p.reshape(kv_heads, batch, repeats * length, p.shape[-1]).transpose(1, 0, 2, 3)
                for p in _partial(scores, cache.prefix_values)
            )
        )
    return _merged(parts).reshape(batch, heads, length, depth).astype(queries.dtype)


def _partial(scores, values):
    """(row max, sum of exp(score - max), exp(score - max) @ values) of one part of the keys, in float32
    whatever the model's dtype; a row with every key masked gives sum 0 and output 0."""
    scores = scores.astype(mx.float32)
    top = scores.max(axis=-1, keepdims=True)
    top = mx.where(top == -mx.inf, 0.0, top)
    weights = _exp(scores - top)
    return top, weights.sum(axis=-1, keepdims=True), weights @ values.astype(mx.float32)


def _merged(parts):
    top = parts[0][0]
    for part_top, _, _ in parts[1:]:
        top = mx.maximum(top, part_top)
    total, output = 0.0, 0.0
    for part_top, part_sum, part_output in parts:
        factor = _exp(part_top - top)
        total, output = total + part_sum * factor, output + part_output * factor
    return output / mx.where(total == 0, 1.0, total)


def _exp(x):
    if x.dtype == mx.float32 and mx.default_device() == mx.cpu:
        return fast_exp.exp(x)
    return mx.exp(x)


def prefix_layers(model, prefix: list[int]) -> list[tuple]:
    """Each layer's (keys, values) of `prefix` run through the model, batch 1."""
    cache = make_prompt_cache(model)
    model(mx.array([prefix]), cache=cache)
    layers = [c.keys_and_values() if hasattr(c, "keys_and_values") else c.state for c in cache]
    mx.eval(layers)
    return layers


def generate(
    model,
    prompts: list[list[int]],
    caps: list[int],
    stop_ids: set[int],
    sampler: Callable | None = None,
    shared: tuple[int, list[tuple]] | None = None,
    own: list[list[tuple]] | None = None,
) -> list[list[int]]:
    """Each prompt's answer (token ids, at most its cap, the stop token not included), decoded together.

    With `shared` = (P, each layer's prefix keys and values) and `own` = each row's keys and values of
    its tokens P .. len(prompt) - 2 (the caches of a pass already made over the prompts), only each
    prompt's last token is fed; otherwise the prompts' common prefix is run once and the rest of every
    prompt as one left-padded batch. `sampler` takes logits [rows, vocab] (None: greedy)."""
    with decoding(model):
        if shared is None:
            length = min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)
            shared = (length, prefix_layers(model, prompts[0][:length]) if length else None)
        length, prefix = shared
        pending = [p[-1:] for p in prompts] if own is not None else [p[length:] for p in prompts]
        caches = _caches(model, prefix, own, [len(p) for p in pending])
        width = max(map(len, pending))
        inputs = mx.array([[0] * (width - len(p)) + list(p) for p in pending])
        logits = model(inputs, cache=caches)[:, -1, :]
        return _decode(model, caches, logits, caps, stop_ids, sampler or _greedy)


def _greedy(logits):
    return mx.argmax(logits, axis=-1)


def _caches(model, prefix, own, pending_lengths: list[int]) -> list[SharedPrefixCache]:
    """One SharedPrefixCache per layer: the prefix, each row's own cached tokens (left-padded to the
    longest) and the padding the pending tokens need."""
    layers = len(make_prompt_cache(model))
    width = max(pending_lengths)
    caches = []
    for layer in range(layers):
        prefix_keys, prefix_values = prefix[layer] if prefix else (None, None)
        if own is None:
            keys = values = None
            padding = [width - n for n in pending_lengths]
        else:
            cached = [row[layer][0].shape[2] for row in own]
            most = max(cached)
            padding = [most - n for n in cached]
            keys = _left_padded([row[layer][0] for row in own], most)
            values = _left_padded([row[layer][1] for row in own], most)
        caches.append(SharedPrefixCache(prefix_keys, prefix_values, keys, values, padding))
    return caches


def _left_padded(arrays: list, width: int):
    if width == 0:
        return None
    return mx.concatenate([mx.pad(a, [(0, 0), (0, 0), (width - a.shape[2], 0), (0, 0)]) for a in arrays])


def _decode(model, caches, logits, caps, stop_ids, sampler) -> list[list[int]]:
    answers: list[list[int]] = [[] for _ in caps]
    rows: list[int | None] = list(range(len(caps)))  # the prompt in each cache row; None once it is answered
    while True:
        tokens = sampler(logits)
        for row, token in enumerate(tokens.tolist()):
            prompt = rows[row]
            if prompt is None:
                continue
            if token in stop_ids:
                rows[row] = None
                continue
            answers[prompt].append(token)
            if len(answers[prompt]) >= caps[prompt]:
                rows[row] = None
        live = [row for row, prompt in enumerate(rows) if prompt is not None]
        if not live:
            return answers
        if len(live) <= (1 - COMPACT_WHEN_DONE) * len(rows):
            for cache in caches:
                cache.filter(live)
            tokens, rows = tokens[mx.array(live)], [rows[row] for row in live]
        logits = model(tokens[:, None], cache=caches)[:, -1, :]
