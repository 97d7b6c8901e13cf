"""A causal LM as body (tokens -> final hidden states) and head (hidden states -> logits), so the loss
can run the output layer only where a token is trained.

On the default data a batch trains ~135 of ~600 positions, and the output layer (a 49k-token
vocabulary) with its log-sum-exp is a large part of a training step on CPU; computing it at the
trained positions only gives the same loss, term for term. Only architectures whose forward pass is
exactly `head(model.model(inputs))` are split (listed in SPLIT_TYPES, checked in the tests against
the full forward pass); any other gets None and the caller computes every position's logits.
"""

from __future__ import annotations

from collections.abc import Callable

SPLIT_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # Model.__call__: out = self.model(x); lm_head or tied


def split(model) -> tuple[Callable, Callable] | None:
    """(body, head) of an mlx-lm model, or None when its forward pass is not known to be head(body(x))."""
    if getattr(model, "model_type", None) not in SPLIT_TYPES or not hasattr(model, "model"):
        return None
    inner = model.model
    tied = getattr(model.args, "tie_word_embeddings", False)
    if tied:
        return inner, inner.embed_tokens.as_linear
    if hasattr(model, "lm_head"):
        return inner, model.lm_head
    return None
