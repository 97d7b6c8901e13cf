"""lm/fast_math: the polynomial exp, SwiGLU and attention eval uses on CPU agree with MLX's own."""

from __future__ import annotations

import sys

import pipeline  # noqa: F401  (the fast BLAS before MLX)

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.generate import batch_generate
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import make_prompt_cache

from lm import fast_math


def test_fast_exp_is_as_accurate_as_float32_exp():
    x = mx.linspace(-87.0, 88.0, 200_001)
    relative = mx.abs(fast_math.fast_exp(x) - mx.exp(x)) / mx.exp(x)
    assert relative.max().item() < 3e-7
    assert fast_math.fast_exp(mx.array([0.0])).item() == 1.0


def test_fast_exp_of_a_masked_score_is_exactly_zero():
    assert fast_math.fast_exp(mx.array([-89.0, -1e30, -mx.inf])).tolist() == [0.0, 0.0, 0.0]


def test_fast_swiglu_matches_mlx_lm():
    gate, x = mx.random.normal((64, 256), key=mx.random.key(0)) * 8, mx.random.normal((64, 256), key=mx.random.key(1))
    gate = mx.concatenate([gate, mx.array([[-200.0, 200.0] * 128])])
    x = mx.concatenate([x, mx.ones((1, 256))])
    assert mx.abs(fast_math.fast_swiglu(gate, x) - swiglu(gate, x)).max().item() < 1e-5


def attention_inputs(length: int, span: int):
    keys = [mx.random.key(n) for n in range(3)]
    queries = mx.random.normal((2, 6, length, 16), key=keys[0])
    return queries, mx.random.normal((2, 2, span, 16), key=keys[1]), mx.random.normal((2, 2, span, 16), key=keys[2])


@pytest.mark.parametrize(
    "length, span, mask",
    [(12, 12, "causal"), (5, 12, "causal"), (1, 12, None), (12, 12, None)],
    ids=["causal", "causal-after-a-cache", "one-token-decode", "no-mask"],
)
def test_fast_attention_matches_mlx(length, span, mask):
    q, k, v = attention_inputs(length, span)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert mx.abs(fast_math.fast_attention(q, k, v, 0.25, mask) - expected).max().item() < 1e-5


def test_fast_attention_with_a_padding_mask_stays_finite_where_a_row_sees_nothing():
    q, k, v = attention_inputs(6, 6)
    keep = np.tril(np.ones((6, 6), bool))[None, None].repeat(2, axis=0)
    keep[1, :, :, :2] = False  # left padding of two positions: rows 0 and 1 of sequence 1 see no key
    keep = mx.array(keep)
    got = fast_math.fast_attention(q, k, v, 0.25, keep)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=keep)
    assert mx.isfinite(got).all().item()
    assert mx.abs(got[1, :, 2:] - expected[1, :, 2:]).max().item() < 1e-5
    assert mx.abs(got[0] - expected[0]).max().item() < 1e-5


def test_fast_attention_declines_what_it_does_not_know():
    q, k, v = attention_inputs(4, 4)
    assert fast_math.fast_attention(q, k, v, 0.25, mx.zeros((4, 4))) is None  # an additive mask


def test_a_model_inside_the_fast_path_gives_the_same_logits_and_answers(tiny_model_dir):
    model, tokenizer = load(str(tiny_model_dir))
    module = sys.modules[type(model).__module__]
    original = module.scaled_dot_product_attention
    ids = mx.array([[1, 5, 9, 14, 3, 7, 2, 11] * 4])
    prompts = [[1, 5, 9, 14], [1, 7, 2, 11, 5, 9, 3, 4, 8]]

    def logits_and_answers():
        cache = make_prompt_cache(model)
        whole = model(ids)
        model(ids[:, :20], cache=cache)
        continued = model(ids[:, 20:], cache=cache)
        answers = batch_generate(model, tokenizer, prompts, max_tokens=12, verbose=False).texts
        return whole, continued, answers

    whole, continued, answers = logits_and_answers()
    with fast_math.cpu_fast_path(model):
        assert module.scaled_dot_product_attention is not original
        fast_whole, fast_continued, fast_answers = logits_and_answers()
    assert module.scaled_dot_product_attention is original
    assert mx.abs(fast_whole - whole).max().item() < 1e-4
    assert mx.abs(fast_continued - whole[:, 20:]).max().item() < 1e-4
    assert mx.abs(fast_continued - continued).max().item() < 1e-4
    assert fast_answers == answers
