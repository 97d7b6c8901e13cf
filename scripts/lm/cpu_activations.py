"""Attention softmax, SwiGLU and log-sum-exp through NumPy, for forward passes on CPU.

MLX's CPU backend evaluates exp one element at a time on one thread (~55M/s here); NumPy's
vectorized exp is ~20x faster. In a loss pass over long records these three ops are most of the
time, so scoring runs them in NumPy: the same float32 formulas, the matmuls still in MLX (BLAS).
Each NumPy call waits for the MLX graph up to its input, so this pays only on large inputs, and it
cannot be differentiated: it is for scoring, never for training.
"""

import contextlib
import sys

import mlx.core as mx
import numpy as np

# Below this many elements the MLX op is as fast as the round trip through NumPy.
MIN_ELEMENTS = 1 << 16


def sdpa(queries, keys, values, cache, scale: float, mask, sinks=None, *, fallback):
    """mlx_lm.models.base.scaled_dot_product_attention, with the softmax in NumPy for float32
    inputs of at least MIN_ELEMENTS scores; anything else goes to `fallback` unchanged."""
    batch, heads, length, depth = queries.shape
    kv_heads, key_length = keys.shape[1], keys.shape[2]
    if (
        sinks is not None
        or hasattr(cache, "bits")
        or queries.dtype != mx.float32
        or not (mask is None or isinstance(mask, mx.array) or mask == "causal")
        or batch * heads * length * key_length < MIN_ELEMENTS
    ):
        return fallback(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    repeats = heads // kv_heads
    # Query head h reads key head h // repeats, so the heads of one key head stack as rows.
    grouped = (queries * scale).reshape(batch, kv_heads, repeats * length, depth)
    scores = np.array(grouped @ keys.swapaxes(-1, -2)).reshape(batch, heads, length, key_length)
    if mask is not None:
        scores += additive_mask(causal_mask(length, key_length) if isinstance(mask, str) else np.asarray(mask))
    probs = mx.array(softmax(scores).reshape(batch, kv_heads, repeats * length, key_length))
    return (probs @ values).reshape(batch, heads, length, depth)


def causal_mask(length: int, key_length: int) -> np.ndarray:
    """Query i (the last `length` of `key_length` positions) sees keys 0 .. key_length - length + i."""
    return np.arange(key_length - length, key_length)[:, None] >= np.arange(key_length)[None]


def additive_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean mask (True: attend) as 0 / -inf to add to the scores; an additive one as it is."""
    if mask.dtype != np.bool_:
        return mask
    return np.where(mask, np.float32(0), np.float32(-np.inf))


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place."""
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def swiglu(gate, x, *, fallback):
    """silu(gate) * x."""
    if gate.dtype != mx.float32 or gate.size < MIN_ELEMENTS:
        return fallback(gate, x)
    gate_np = np.array(gate)
    with np.errstate(over="ignore"):  # exp(-gate) = inf makes silu 0, as it should
        denominator = np.exp(-gate_np)
    denominator += 1
    gate_np /= denominator
    gate_np *= np.asarray(x)
    return mx.array(gate_np)


def logsumexp(logits) -> np.ndarray:
    """log(sum(exp(row))) of each row of a 2-D float32 MLX array, as NumPy float64."""
    rows = np.array(logits.astype(mx.float32))
    top = rows.max(axis=-1, keepdims=True)
    rows -= top
    np.exp(rows, out=rows)
    return np.log(rows.sum(axis=-1, dtype=np.float64)) + top[:, 0]


def numpy_activations(model):
    """Within the block, `model`'s attention and SwiGLU use the NumPy paths above, when its module
    imports mlx-lm's shared functions under their usual names (llama, qwen2, mistral and most
    others); a model that does not is left as it is."""
    return swapped_activations(model, sdpa, swiglu)


@contextlib.contextmanager
def swapped_activations(model, sdpa_impl, swiglu_impl):
    """Within the block, the module of `model` calls sdpa_impl and swiglu_impl (each given the original
    as `fallback=`) in place of mlx-lm's scaled_dot_product_attention and swiglu."""
    module = sys.modules[type(model).__module__]
    originals = {name: getattr(module, name, None) for name in ("scaled_dot_product_attention", "swiglu")}
    replacements = {
        "scaled_dot_product_attention": lambda *a, **kw: sdpa_impl(
            *a, **kw, fallback=originals["scaled_dot_product_attention"]
        ),
        "swiglu": lambda *a, **kw: swiglu_impl(*a, **kw, fallback=originals["swiglu"]),
    }
    patched = [name for name, original in originals.items() if callable(original)]
    for name in patched:
        setattr(module, name, replacements[name])
    try:
        yield
    finally:
        for name in patched:
            setattr(module, name, originals[name])
