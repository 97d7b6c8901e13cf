"""lm.fast_exp: the polynomial exp against float64 exp, and SiLU and softmax with their gradients against
MLX's own, within float32 rounding; swapped into a model only inside the block."""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm import load

from lm import fast_exp


def test_exp_is_as_accurate_as_float32_allows():
    x = np.linspace(-87.0, 87.9, 400_001, dtype=np.float32)
    got = np.array(fast_exp.exp(mx.array(x))).astype(np.float64)
    expected = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - expected) / expected) < 4e-7
    edges = np.array(fast_exp.exp(mx.array([-200.0, -88.0, 0.0, 89.0, 1000.0])))
    assert edges.tolist() == [0.0, 0.0, 1.0, np.inf, np.inf]


def test_silu_and_softmax_match_mlx_with_their_gradients():
    x = mx.array(np.random.default_rng(0).normal(0, 4, 10_000).astype(np.float32))
    np.testing.assert_allclose(np.array(fast_exp.silu(x)), np.array(nn.silu(x)), atol=2e-6, rtol=1e-5)
    got = mx.grad(lambda v: fast_exp.silu(v).sum())(x)
    np.testing.assert_allclose(np.array(got), np.array(mx.grad(lambda v: nn.silu(v).sum())(x)), atol=2e-6)
    scores = mx.array(np.random.default_rng(1).normal(0, 5, (2, 3, 7, 11)).astype(np.float32))
    weights = mx.array(np.random.default_rng(2).normal(0, 1, scores.shape).astype(np.float32))
    np.testing.assert_allclose(np.array(fast_exp.softmax(scores)), np.array(mx.softmax(scores, axis=-1)), atol=1e-6)
    got = mx.grad(lambda s: (fast_exp.softmax(s) * weights).sum())(scores)
    expected = mx.grad(lambda s: (mx.softmax(s, axis=-1) * weights).sum())(scores)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-6)


def test_the_model_uses_them_inside_the_block_only(tiny_model_dir):
    model, _ = load(str(tiny_model_dir))
    module = sys.modules[type(model).__module__]
    original = module.swiglu
    tokens = mx.array([list(range(3, 40))])
    expected = np.array(model(tokens))
    with fast_exp.fast_activations(model):
        assert module.swiglu is not original
        np.testing.assert_allclose(np.array(model(tokens)), expected, atol=1e-4)
    assert module.swiglu is original
