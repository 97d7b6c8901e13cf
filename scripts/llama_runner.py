"""Running GGUF files in llama.cpp (through llama-cpp-python): greedy answers and masked perplexity.

Shared by quantize (export check) and eval (scoring GGUF artifacts), so both measure the same way.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

# llama.cpp logs every tensor it loads or quantizes; show its errors only, unless debugging.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def open_llama(gguf_path: Path, n_ctx: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=512, n_threads=os.cpu_count() or 1, logits_all=logits_all, verbose=False, seed=0)


def greedy(llm, prompt: list[int], max_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy tokens after `prompt`, the stop token included, at most max_tokens.

    With reset=True llama-cpp-python keeps the KV cache of the longest prefix shared with the
    previous prompt and evaluates only the rest (test prompts share their system prompt).
    """
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if token in stop_ids or len(tokens) >= max_tokens:
            break
    return tokens


def sample(llm, prompt: list[int], max_tokens: int, stop_ids: set[int], temperature: float, top_p: float, seed: int) -> list[int]:
    """Sampled tokens (the generation policy's temperature and top_p), reproducible for a seed."""
    llm.set_seed(seed)
    tokens = []
    for token in llm.generate(prompt, temp=temperature, top_p=top_p, top_k=0, min_p=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if token in stop_ids or len(tokens) >= max_tokens:
            break
    return tokens


def shared_prefix_length(items: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """How many leading tokens every item shares and none of them scores (the system prompt, usually)."""
    if len(items) < 2:
        return 0
    length = len(os.path.commonprefix([ids.tolist() for ids, _ in items]))
    first_scored = min(int(np.argmax(mask > 0)) if mask.any() else len(mask) for _, mask in items)
    return max(0, min(length, first_scored - 1, min(len(ids) for ids, _ in items) - 1))


def masked_nll(llm, items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, int]:
    """Summed negative log-likelihood of the masked target tokens, and how many there were.

    The target of position i is token i+1 and counts when mask[i+1] is set, as in training. The
    shared prefix is evaluated once; each item then evaluates only what follows it.
    """
    prefix = shared_prefix_length(items)
    if prefix:
        llm.reset()
        llm.eval(items[0][0][:prefix].tolist())
    total, count = 0.0, 0
    for ids, mask in items:
        _rewind(llm, prefix)
        llm.eval(ids[prefix:].tolist())
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        peak = logits.max(-1)
        log_z = np.log(np.exp(logits - peak[:, None]).sum(-1)) + peak
        token_nll = log_z - logits[np.arange(len(ids) - 1), ids[1:]]
        total += float((token_nll * mask[1:]).sum())
        count += int(mask[1:].sum())
    return total, count


def _rewind(llm, length: int) -> None:
    """Forget everything after the first `length` tokens (their KV cache entries included)."""
    if length == 0:
        llm.reset()
        return
    llm._ctx.kv_cache_seq_rm(-1, length, -1)
    llm.n_tokens = length


def perplexity(gguf_path: Path, items: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    llm = open_llama(gguf_path, n_ctx=max(len(ids) for ids, _ in items) + 8, logits_all=True)
    nll, count = masked_nll(llm, items)
    return {"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count}
