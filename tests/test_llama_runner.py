"""llama_runner on a tiny float32 GGUF: batched greedy answers and batched perplexity give what one
prompt at a time gives."""

from __future__ import annotations

from pipeline.errors import PipelineError

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


def long_prompts(count: int, seed: int = 1) -> list[list[int]]:
    """Prompts near the tiny model's trained context of 512 tokens (with 30 answer tokens, up to 510)."""
    rng = np.random.default_rng(seed)
    return [PREFIX + rng.integers(5, 400, size=int(rng.integers(380, 441))).tolist() for _ in range(count)]


def test_groups_within_splits_where_the_room_runs_out():
    assert llama_runner.groups_within([3, 3, 3, 10, 1], room=6, most=4) == [[0, 1], [2], [3], [4]]
    assert llama_runner.groups_within([1] * 5, room=100, most=2) == [[0, 1], [2, 3], [4]]
    assert llama_runner.groups_within([], room=10, most=2) == []


def planned_groups(monkeypatch) -> list:
    """The groups llama_runner plans, one list per call, as it plans them."""
    planned, plan = [], llama_runner.groups_within
    monkeypatch.setattr(llama_runner, "groups_within", lambda *args: planned.append(plan(*args)) or planned[-1])
    return planned


def test_long_prompts_beyond_one_context_answer_as_one_at_a_time(tiny_gguf, monkeypatch):
    asked = long_prompts(12)
    stop_ids = {7, 11, 13}
    monkeypatch.setattr(llama_runner, "MAX_CONTEXT_TOKENS", 1500)  # room for 3 such prompts: 4 groups
    planned = planned_groups(monkeypatch)
    batched = llama_runner.greedy_batch(tiny_gguf, asked, 30, stop_ids)
    assert len(planned[0]) >= 4 and max(map(len, planned[0])) > 1
    llm = llama_runner.open_llama(tiny_gguf, n_ctx=512)
    assert batched == [llama_runner.greedy(llm, p, 30, stop_ids) for p in asked]
    assert max(len(p) + len(a) for p, a in zip(asked, batched)) > 470  # positions near the trained context


def test_64_prompts_far_beyond_the_trained_context_share_one_context(tiny_gguf, monkeypatch):
    asked = [PREFIX + p[len(PREFIX) : len(PREFIX) + 100] for p in long_prompts(64, seed=2)]
    planned = planned_groups(monkeypatch)
    batched = llama_runner.greedy_batch(tiny_gguf, asked, 32, set())
    assert [len(group) for group in planned[0]] == [64]
    assert sum(len(p) + len(a) for p, a in zip(asked, batched)) > 10000  # the trained context is 512
    llm = llama_runner.open_llama(tiny_gguf, n_ctx=512)
    assert batched == [llama_runner.greedy(llm, p, 32, set()) for p in asked]


def long_items() -> list[tuple[np.ndarray, np.ndarray]]:
    """Many short records, then records near the trained context: later batches hold fewer, longer items."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(10, 30, size=40).tolist() + rng.integers(400, 470, size=6).tolist()
    items = []
    for length in lengths:
        ids = np.array(PREFIX + rng.integers(5, 400, size=int(length)).tolist())
        mask = np.zeros(len(ids), np.int32)
        mask[len(PREFIX) + length // 2 :] = 1
        items.append((ids, mask))
    return items


def test_perplexity_over_long_items_after_short_ones(tiny_gguf):
    items = long_items()
    nll, count = llama_runner.masked_nll(tiny_gguf, items)
    expected_nll, expected_count = plain_nll(tiny_gguf, items)
    assert count == expected_count
    assert nll == pytest.approx(expected_nll, rel=1e-4)
    assert llama_runner.perplexity(tiny_gguf, items)["tokens"] == count


def test_a_prompt_or_record_too_long_for_the_model_is_a_clear_error(tiny_gguf):
    asked = [PREFIX + [9] * 10, PREFIX + [9] * 440]
    with pytest.raises(
        PipelineError, match=r"prompt 2 of 2 has 480 tokens; .* up to 48 .* 512 tokens .*eval\.max_tokens"
    ):
        llama_runner.greedy_batch(tiny_gguf, asked, 48, set())
    items = long_items() + [(np.arange(600) % 400 + 5, np.ones(600, np.int32))]
    with pytest.raises(PipelineError, match=r"record 47 of 47 has 600 tokens, .* 512 .*data\.max_seq_length"):
        llama_runner.masked_nll(tiny_gguf, items)


def test_a_decode_without_room_says_why(tiny_gguf):
    model = llama_runner.load_model(tiny_gguf)
    try:
        with llama_runner.Sequences(model, tiny_gguf, [], 2, n_ctx=200) as run:  # llama.cpp: 512 cells, batches of 264
            assert run.n_batch >= 260 and run.n_ctx < 520  # room for 260 new tokens at once, not for 520 in all
            run.decode([(seq, list(range(5, 135)), 0, [129]) for seq in (1, 2)])
            more = [(seq, list(range(5, 135)), 130, [129]) for seq in (1, 2)]
            with pytest.raises(
                PipelineError,
                match=r"no room in its KV cache for 2 sequences of up to 260 tokens .*n_ctx 512.* returned 1\)",
            ):
                run.decode(more)
            too_many = [(seq, list(range(5, 305)), 0, [299]) for seq in (1, 2)]
            with pytest.raises(PipelineError, match=r"cannot take so many tokens in one batch .*600 new in this batch"):
                run.decode(too_many)  # llama.cpp itself would abort the process
    finally:
        model.close()
