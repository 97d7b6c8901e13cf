"""A vectorizable exp for MLX on CPU, and the differentiable SwiGLU and attention softmax built on it,
for training.

MLX's CPU backend calls the C library's exp once per element on one thread (~55M/s here), so SiLU
and the attention softmax are a large part of a training step's forward and backward passes. exp(x)
= 2^k · p(r) with k = round(x / ln 2), |r| ≤ ln 2 / 2 and p the degree-6 Taylor polynomial (relative
error below 3e-7, about float32's rounding) is only multiplies, adds and a bit shift, which
mx.compile fuses into one loop the C++ compiler vectorizes. Gradients are given explicitly
(mx.custom_function), so the backward pass uses the same fast exp.

fast_activations(model) swaps them into the model's module for a block, as
lm.cpu_activations.numpy_activations does for scoring; float32 on CPU only, anything else unchanged.
"""

from __future__ import annotations

import math

import mlx.core as mx

from lm import cpu_activations

LOG2E = 1.0 / math.log(2.0)
LN2_HI, LN2_LO = 0.693359375, math.log(2.0) - 0.693359375  # ln 2 in two parts (Cody-Waite): k·LN2_HI is exact
TAYLOR = [1.0 / math.factorial(n) for n in range(6, -1, -1)]  # highest degree first (Horner)


@mx.compile
def exp(x):
    """exp(x) for float32 x: 0 below -87.3 (float32's exp goes subnormal there) and +inf above 88."""
    clipped = mx.clip(x, -87.3, 88.0)
    k = mx.floor(clipped * LOG2E + 0.5)
    r = (clipped - k * LN2_HI) - k * LN2_LO
    p = TAYLOR[0]
    for coefficient in TAYLOR[1:]:
        p = p * r + coefficient
    two_k = mx.left_shift(k.astype(mx.int32) + 127, 23).view(mx.float32)
    return mx.where(x > 88.0, mx.inf, mx.where(x < -87.3, 0.0, p * two_k))


@mx.compile
def _sigmoid(x):
    return 1.0 / (1.0 + exp(-x))


@mx.custom_function
def silu(x):
    return x * _sigmoid(x)


@silu.vjp
def _silu_vjp(x, cotangent, output):  # one primal: given as the array itself
    s = _sigmoid(x)
    return cotangent * (s * (1.0 + x * (1.0 - s)))


def swiglu(gate, x, *, fallback):
    """silu(gate) * x."""
    if gate.dtype != mx.float32 or mx.default_device() != mx.cpu:
        return fallback(gate, x)
    return silu(gate) * x


@mx.custom_function
def softmax(scores):
    """Softmax over the last axis."""
    e = exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


def sdpa(queries, keys, values, cache, scale: float, mask, sinks=None, *, fallback):
    """mlx_lm.models.base.scaled_dot_product_attention with the softmax above, for float32 on CPU with
    no sinks and no quantized cache (training; the keys may start with a cached prefix, train.prefix);
    anything else goes to `fallback` unchanged."""
    if (
        hasattr(cache, "bits")
        or sinks is not None
        or queries.dtype != mx.float32
        or mx.default_device() != mx.cpu
        or not (mask is None or isinstance(mask, mx.array) or mask == "causal")
    ):
        return fallback(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    batch, heads, length, depth = queries.shape
    kv_heads, key_length = keys.shape[1], keys.shape[2]
    repeats = heads // kv_heads
    grouped = (queries * scale).reshape(batch, kv_heads, repeats * length, depth)
    scores = (grouped @ keys.swapaxes(-1, -2)).reshape(batch, heads, length, key_length)
    if isinstance(mask, str):
        rows = mx.arange(key_length - length, key_length)[:, None]
        scores = mx.where(rows >= mx.arange(key_length)[None], scores, -mx.inf)
    elif mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    probs = softmax(scores).reshape(batch, kv_heads, repeats * length, key_length)
    return (probs @ values).reshape(batch, heads, length, depth)


def fast_activations(model):
    """Within the block, `model`'s attention softmax and SwiGLU use the fast exp, when its module imports
    mlx-lm's shared functions under their usual names; a model that does not is left as it is."""
    return cpu_activations.swapped_activations(model, sdpa, swiglu)


def scoring_activations(model):
    """For forward passes only (eval): the attention softmax and SwiGLU of lm.cpu_activations (NumPy) on
    large inputs, as in a loss pass, and SwiGLU with the fast exp on the small ones of a decoding step,
    where the round trip through NumPy does not pay and MLX's own SiLU is ~3x slower."""

    def swiglu_impl(gate, x, *, fallback):
        return cpu_activations.swiglu(gate, x, fallback=lambda g, y: swiglu(g, y, fallback=fallback))

    return cpu_activations.swapped_activations(model, cpu_activations.sdpa, swiglu_impl)
