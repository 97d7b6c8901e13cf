"""Cascade attention over a shared prefix equals attention over each whole row, and batched decoding
with the prefix kept once gives mlx-lm's batch_generate answers, from prompts or from their caches."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.generate import batch_generate
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from lm import shared_prefix


def fallback_never(*args, **kwargs):
    raise AssertionError("a SharedPrefixCache went to the fallback")


@pytest.mark.parametrize(
    "length, dtype, tolerance",
    [(1, mx.float32, 2e-5), (5, mx.float32, 2e-5), (1, mx.bfloat16, 3e-2)],  # a decoding step; a left-padded prefill
)
def test_cascade_attention_equals_attention_over_each_whole_row(length, dtype, tolerance):
    rng = np.random.default_rng(0)
    batch, heads, kv_heads, depth, prefix, own = 3, 6, 2, 16, 40, 9
    prefix_k, prefix_v = (mx.array(rng.standard_normal((1, kv_heads, prefix, depth), dtype=np.float32)) for _ in "kv")
    own_k, own_v = (mx.array(rng.standard_normal((batch, kv_heads, own, depth), dtype=np.float32)) for _ in "kv")
    queries = mx.array(rng.standard_normal((batch, heads, length, depth), dtype=np.float32))
    # The last row has no own token before this step's; in the prefill, its first two queries are padding.
    padding = [0, 3, own - 1 if length == 1 else own - length + 2]
    cache = shared_prefix.SharedPrefixCache(prefix_k, prefix_v, None, None, padding)
    cache._idx = own - length  # as if own - length tokens were in, and this step's are the last `length`
    cache.keys, cache.values = own_k, own_v
    mask = cache.make_mask(length)
    prefix_k, prefix_v, own_k, own_v, queries = (a.astype(dtype) for a in (prefix_k, prefix_v, own_k, own_v, queries))
    cache.prefix_keys, cache.prefix_values = prefix_k, prefix_v
    got = shared_prefix.attention(queries, own_k, own_v, cache, 0.3, mask, fallback=fallback_never)
    assert got.dtype == dtype

    whole_k = mx.concatenate([mx.repeat(prefix_k, batch, axis=0), own_k], axis=2)
    whole_v = mx.concatenate([mx.repeat(prefix_v, batch, axis=0), own_v], axis=2)
    own_mask = create_causal_mask(length, offset=own - length, left_padding=mx.array(padding))
    whole_mask = mx.concatenate([mx.ones((batch, 1, length, prefix), mx.bool_), own_mask], axis=-1)
    expected = mx.fast.scaled_dot_product_attention(queries, whole_k, whole_v, scale=0.3, mask=whole_mask)
    for row, pad in enumerate(padding):
        real = slice(max(0, pad - (own - length)), length)  # queries at padded positions are not used
        np.testing.assert_allclose(
            np.array(got[row, :, real].astype(mx.float32)),
            np.array(expected[row, :, real].astype(mx.float32)),
            atol=tolerance,
        )
    assert not np.isnan(np.array(got.astype(mx.float32))).any()  # a padded query (no own key) still gives numbers


def test_other_caches_go_to_the_fallback():
    calls = []
    q = k = v = mx.ones((1, 2, 1, 8))
    shared_prefix.attention(q, k, v, KVCache(), 1.0, None, fallback=lambda *a, **kw: calls.append("kv"))
    shared_prefix.attention(q, k, v, None, 1.0, None, fallback=lambda *a, **kw: calls.append("none"))
    assert calls == ["kv", "none"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = load(str(tiny_model_dir))
    prefix = tokenizer.encode("<|im_start|>system\nthe model calls a tool json weather city<|im_end|>\n")
    questions = ["paris", "the weather in london today", "tokyo time", "name value date city json tool call"]
    prompts = [
        prefix + tokenizer.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n") for q in questions
    ]
    return model, tokenizer, prompts, len(prefix)


def batch_answers(model, tokenizer, prompts, caps):
    response = batch_generate(
        model, tokenizer, prompts, max_tokens=caps, sampler=make_sampler(temp=0.0), return_token_ids=True
    )
    return [list(map(int, ids)) for ids in response.token_ids]


def test_answers_equal_batch_generate(tiny):
    model, tokenizer, prompts, _ = tiny
    assert shared_prefix.supported(model)
    caps = [12, 5, 16, 9]
    expected = batch_answers(model, tokenizer, prompts, caps)
    got = shared_prefix.generate(model, prompts, caps, set(tokenizer.eos_token_ids))
    assert got == expected
    assert [len(a) for a in got] == caps  # a random model runs to its caps: every step is compared


def test_answers_from_the_prompts_caches_equal_batch_generate(tiny):
    model, tokenizer, prompts, prefix_length = tiny
    caps = [10, 10, 3, 14]
    prefix = shared_prefix.prefix_layers(model, prompts[0][:prefix_length])
    own = []
    for prompt in prompts:  # each row's tokens after the prefix but its last, run on a copy of the prefix
        cache = make_prompt_cache(model)
        for layer, (keys, values) in zip(cache, prefix):
            layer.state = (keys, values, prefix_length)
        model(mx.array([prompt[prefix_length:-1]]), cache=cache)
        own.append(
            [(c.keys[..., prefix_length : c.offset, :], c.values[..., prefix_length : c.offset, :]) for c in cache]
        )
    got = shared_prefix.generate(
        model, prompts, caps, set(tokenizer.eos_token_ids), shared=(prefix_length, prefix), own=own
    )
    assert got == batch_answers(model, tokenizer, prompts, caps)


def test_a_stop_token_ends_an_answer_and_is_not_in_it(tiny):
    model, tokenizer, prompts, _ = tiny
    free = shared_prefix.generate(model, prompts, [8] * 4, set())
    stop = free[1][3]  # the fourth token of the second answer stops it there
    got = shared_prefix.generate(model, prompts, [8] * 4, {stop})
    for answer, full in zip(got, free):
        assert answer == full[: full.index(stop)] if stop in full else answer == full
    assert got[1] == free[1][: free[1].index(stop)]
