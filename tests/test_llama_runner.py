"""llama_runner on a tiny float32 GGUF: batched greedy answers and batched perplexity give what one
prompt at a time gives."""

from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import Llama

from lm import hf_to_gguf as gguf_export
from lm import llama_runner

PREFIX = list(range(5, 45))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    gguf_export.write_gguf(tiny_model_dir, path, float_type="float32", chat_template=None, name="tiny")
    return path


def prompts(count: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [PREFIX + rng.integers(5, 400, size=int(rng.integers(3, 30))).tolist() for _ in range(count)]


def test_batched_greedy_answers_equal_one_prompt_at_a_time(tiny_gguf):
    asked = prompts(12)
    stop_ids = {7, 11, 13}
    llm = llama_runner.open_llama(tiny_gguf, n_ctx=128)
    one_by_one = [llama_runner.greedy(llm, p, 20, stop_ids) for p in asked]
    batched = llama_runner.greedy_batch(tiny_gguf, asked, 20, stop_ids)
    assert batched == one_by_one
    assert len({tuple(a) for a in batched}) > 1  # different prompts, different answers: nothing is shared by mistake
    assert all(0 < len(a) <= 20 for a in batched)


def plain_nll(gguf_path, items) -> tuple[float, int]:
    """Each item evaluated from scratch, all logits kept, no prefix reuse."""

    llm = Llama(model_path=str(gguf_path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    total, count = 0.0, 0
    for ids, mask in items:
        llm.reset()
        llm.eval(ids.tolist())
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        log_probs = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        token_nll = -log_probs[np.arange(len(ids) - 1), ids[1:]]
        total += float((token_nll * mask[1:]).sum())
        count += int(mask[1:].sum())
    return total, count


def test_batched_perplexity_equals_the_plain_per_item_loss(tiny_gguf):
    items = []
    for ids in prompts(30):  # 30 items of up to ~70 tokens after the prefix: several batches of 512
        ids = np.array(ids + list(range(100, 100 + len(ids) % 17 + 25)))
        mask = np.zeros(len(ids), np.int32)
        mask[len(PREFIX) + 10 :] = 1
        items.append((ids, mask))
    assert llama_runner.shared_prefix_length(items) == len(PREFIX)
    nll, count = llama_runner.masked_nll(tiny_gguf, items)
    expected_nll, expected_count = plain_nll(tiny_gguf, items)
    assert count == expected_count
    assert nll == pytest.approx(expected_nll, rel=1e-4)


def test_more_prompts_than_llama_cpp_has_sequences(tiny_gguf):
    assert llama_runner.max_sequences() < 300
    asked = [PREFIX + [100 + i % 200, 7 + i % 50] for i in range(300)]
    answers = llama_runner.greedy_batch(tiny_gguf, asked, 3, set())
    assert len(answers) == 300 and all(len(a) == 3 for a in answers)
    assert answers[:12] == llama_runner.greedy_batch(tiny_gguf, asked[:12], 3, set())
    items = [(np.array(p + [9]), np.array([0] * len(p) + [1])) for p in asked]
    nll, count = llama_runner.masked_nll(tiny_gguf, items)
    assert count == 300
    assert nll == pytest.approx(plain_nll(tiny_gguf, items)[0], rel=1e-4)
