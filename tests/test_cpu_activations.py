"""The NumPy attention softmax, SwiGLU and log-sum-exp give what MLX's own ops give, and a model run
inside numpy_activations gives the logits it gives outside, with its module restored after."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.models.activations import swiglu as mlx_swiglu
from mlx_lm.models.base import scaled_dot_product_attention as mlx_sdpa
from mlx_lm.models.cache import KVCache

from lm import cpu_activations


def close(a, b, tol=1e-5) -> bool:
    return float(mx.abs(a - b).max()) <= tol * max(1.0, float(mx.abs(b).max()))


def fallback_never(*args, **kwargs):
    raise AssertionError("the NumPy path fell back to MLX")


@pytest.mark.parametrize("queries, keys", [(128, 128), (100, 200)])  # keys past the queries: a cached prefix
def test_causal_grouped_attention_equals_mlx(queries, keys):
    rng = np.random.default_rng(0)
    shapes = [(2, 6, queries, 16), (2, 2, keys, 16), (2, 2, keys, 16)]
    q, k, v = (mx.array(rng.standard_normal(shape, dtype=np.float32)) for shape in shapes)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    got = cpu_activations.sdpa(q, k, v, None, 0.25, "causal", fallback=fallback_never)
    assert got.shape == expected.shape and close(got, expected)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_an_array_mask_equals_mlx(kind):
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.standard_normal((1, 4, 160, 8), dtype=np.float32)) for _ in range(3))
    allowed = rng.random((1, 1, 160, 160)) < 0.7
    allowed[..., 0] = True  # every query sees at least one key
    mask = mx.array(allowed) if kind == "bool" else mx.array(np.where(allowed, 0.0, -1e9).astype(np.float32))
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, mask=mask)
    assert close(cpu_activations.sdpa(q, k, v, None, 0.5, mask, fallback=fallback_never), expected)


def test_small_or_unsupported_inputs_go_to_mlx():
    q = k = v = mx.ones((1, 2, 4, 8))
    calls = []
    cpu_activations.sdpa(q, k, v, None, 1.0, "causal", fallback=lambda *a, **kw: calls.append("small"))
    big = mx.ones((1, 4, 256, 8), dtype=mx.float16)
    cpu_activations.sdpa(big, big, big, None, 1.0, "causal", fallback=lambda *a, **kw: calls.append("float16"))
    assert calls == ["small", "float16"]


def test_swiglu_and_logsumexp_equal_mlx():
    rng = np.random.default_rng(2)
    gate = mx.array(rng.standard_normal((4, 64, 512), dtype=np.float32) * 30)  # far into exp's overflow
    x = mx.array(rng.standard_normal((4, 64, 512), dtype=np.float32))
    assert close(cpu_activations.swiglu(gate, x, fallback=fallback_never), mlx_swiglu(gate, x))
    logits = mx.array(rng.standard_normal((50, 3000), dtype=np.float32) * 10)
    assert np.allclose(cpu_activations.logsumexp(logits), np.array(mx.logsumexp(logits, axis=-1)), rtol=1e-6)


def test_a_model_gives_the_same_logits_and_its_module_is_restored(tiny_model_dir, monkeypatch):
    softmax_calls = []
    numpy_softmax = cpu_activations.softmax
    monkeypatch.setattr(cpu_activations, "softmax", lambda s: softmax_calls.append(s.shape) or numpy_softmax(s))
    model, _ = load(str(tiny_model_dir))
    module = sys.modules[type(model).__module__]
    inputs = mx.array(np.random.default_rng(3).integers(5, 400, size=(3, 300)).astype(np.int32))
    prefix_then_rest = [KVCache() for _ in model.layers], [KVCache() for _ in model.layers]
    expected = model(inputs)
    model(inputs[:, :150], cache=prefix_then_rest[0])
    expected_rest = model(inputs[:, 150:], cache=prefix_then_rest[0])
    with cpu_activations.numpy_activations(model):
        assert module.scaled_dot_product_attention is not mlx_sdpa and module.swiglu is not mlx_swiglu
        got = model(inputs)
        model(inputs[:, :150], cache=prefix_then_rest[1])
        got_rest = model(inputs[:, 150:], cache=prefix_then_rest[1])
    assert module.scaled_dot_product_attention is mlx_sdpa and module.swiglu is mlx_swiglu
    assert len(softmax_calls) == 3 * len(model.layers)  # the NumPy path ran in every layer
    assert close(got, expected, 1e-4) and close(got_rest, expected_rest, 1e-4)
