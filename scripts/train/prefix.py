"""The prefix every training record shares (the system prompt), run once through the frozen layers.

Below the first layer with adapters nothing is trained, so those layers give the shared prefix the same
keys, values and output at every step. On the default data the system prompt (eight tool schemas) is
~100 of ~150 tokens per record and 22 of 30 layers are frozen: `body(model, items)` runs the prefix
through them once, and at each step only each record's own tokens (against the prefix's cached keys and
values). The adapted layers still run every position, the prefix's too: their output there depends on
the adapters. The loss equals the plain body's up to float rounding (tested in test_train).

Only for the architectures lm.heads splits (body = embed -> layers -> norm) with no sliding-window
layers; any other model, no shared prefix, or adapters on the first layer: None, and train uses the
plain body.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from lm import heads

MIN_SHARED_TOKENS = 16  # a shorter prefix saves too little to be worth a path of its own


class PrefixKeysValues:
    """A frozen layer's keys and values of the prefix (batch 1), as the layer's attention reads a cache:
    the batch's own keys and values come after them, at positions from `offset` on."""

    def __init__(self, keys, values):
        self.keys, self.values, self.offset = keys, values, keys.shape[2]

    def update_and_fetch(self, keys, values):
        batch = keys.shape[0]
        return (
            mx.concatenate([mx.broadcast_to(self.keys, (batch, *self.keys.shape[1:])), keys], axis=2),
            mx.concatenate([mx.broadcast_to(self.values, (batch, *self.values.shape[1:])), values], axis=2),
        )


def shared_length(items: list[tuple]) -> int:
    """How many leading tokens every item shares, leaving each item at least one input of its own."""
    if len(items) < 2:
        return 0
    common = len(os.path.commonprefix([ids.tolist() for ids, _ in items]))
    return max(0, min(common, min(len(ids) for ids, _ in items) - 2))


def frozen_layers(model) -> int:
    """How many of the first transformer layers have no trainable parameter."""
    for index, layer in enumerate(model.model.layers):
        if tree_flatten(layer.trainable_parameters()):
            return index
    return len(model.model.layers)


def supported(model) -> bool:
    inner = getattr(model, "model", None)
    return (
        heads.split(model) is not None
        and getattr(inner, "swa_idx", None) is None
        and not any(getattr(layer, "use_sliding", False) for layer in inner.layers)
    )


def body(model, items: list[tuple]) -> Callable | None:
    """inputs [batch, width] -> final hidden states, as model.model gives them, with the prefix every
    item shares run once through the frozen layers; None when that does not apply."""
    if not supported(model):
        return None
    frozen, length = frozen_layers(model), shared_length(items)
    if frozen == 0 or length < MIN_SHARED_TOKENS:
        return None
    inner = model.model
    hidden = inner.embed_tokens(mx.array([items[0][0][:length].tolist()]))
    prefix = []
    for layer in inner.layers[:frozen]:
        keys_values = _Recorder()
        hidden = layer(hidden, "causal", keys_values)
        prefix.append(PrefixKeysValues(keys_values.keys, keys_values.values))
    mx.eval(hidden, [(p.keys, p.values) for p in prefix])

    def run(inputs):
        own = inner.embed_tokens(inputs[:, length:])
        for layer, keys_values in zip(inner.layers[:frozen], prefix):
            own = layer(own, "causal", keys_values)
        own = mx.stop_gradient(own)
        h = mx.concatenate([mx.broadcast_to(hidden, (own.shape[0], length, own.shape[2])), own], axis=1)
        for layer in inner.layers[frozen:]:
            h = layer(h, "causal", None)
        return inner.norm(h)

    return run


class _Recorder:
    """A cache that keeps the keys and values a layer gives it (batch 1, from position 0)."""

    offset = 0

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values
