"""Running GGUF files in llama.cpp (through llama-cpp-python): greedy answers and masked perplexity.

Shared by quantize (export check) and eval (scoring GGUF artifacts), so both measure the same way.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama, _internals

# llama.cpp logs every tensor it loads or quantizes; show its errors only, unless debugging.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def open_llama(gguf_path: Path, n_ctx: int):
    return Llama(
        model_path=str(gguf_path), n_ctx=n_ctx, n_batch=512, n_threads=os.cpu_count() or 1, verbose=False, seed=0
    )


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


def max_sequences() -> int:
    """How many prompts one llama.cpp context can hold besides the shared prefix's sequence."""
    return llama_cpp.llama_max_parallel_sequences() - 1


def greedy_batch(gguf_path: Path, prompts: list[list[int]], max_tokens: int, stop_ids: set[int]) -> list[list[int]]:
    """Greedy answers to many prompts, decoded together: one llama_decode per step for every unfinished
    prompt, as llama.cpp's batched example does (one prompt at a time, each step reads all weights
    for a single token). The prompts' common prefix is evaluated once.

    Float GGUFs answer exactly as one prompt at a time does; for K-quants llama.cpp's CPU backend
    picks other kernels for a batch of tokens than for one, so a near-tie can go the other way.
    """
    if not prompts:
        return []
    if len(prompts) > max_sequences():
        half = len(prompts) // 2
        return greedy_batch(gguf_path, prompts[:half], max_tokens, stop_ids) + greedy_batch(
            gguf_path, prompts[half:], max_tokens, stop_ids
        )
    shared = max(0, min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1))
    n_ctx = shared + sum(len(p) - shared + max_tokens + 1 for p in prompts)
    with Sequences(
        gguf_path, prompts[0][:shared], len(prompts), n_ctx, max(len(p) - shared for p in prompts) * len(prompts)
    ) as run:
        pending = [(seq, prompt[shared:], shared) for seq, prompt in enumerate(prompts, start=1)]
        for seq, _, _ in pending:
            run.fork(seq)
        answers = {seq: [] for seq, _, _ in pending}
        while pending:
            rows = run.decode([(seq, tokens, start, [len(tokens) - 1]) for seq, tokens, start in pending])
            next_pending = []
            for (seq, tokens, start), (row,) in zip(pending, rows):
                token = int(np.argmax(run.logits(row)))
                answers[seq].append(token)
                if token not in stop_ids and len(answers[seq]) < max_tokens:
                    next_pending.append((seq, [token], start + len(tokens)))
            pending = next_pending
        return [answers[seq] for seq in range(1, len(prompts) + 1)]


class Sequences:
    """A llama.cpp context with several KV sequences: sequence 0 holds a prefix evaluated once, and
    sequences 1..n_seq start from a copy of it."""

    def __init__(self, gguf_path: Path, prefix: list[int], n_seq: int, n_ctx: int, batch_tokens: int = 512):
        self.gguf_path, self.prefix, self.n_seq = gguf_path, [int(t) for t in prefix], n_seq
        self.n_ctx, self.n_batch = n_ctx + 64, max(512, len(self.prefix), batch_tokens, n_seq)

    def __enter__(self):
        self.model = _internals.LlamaModel(
            path_model=str(self.gguf_path), params=llama_cpp.llama_model_default_params(), verbose=False
        )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = self.n_ctx, self.n_batch, 512
        params.n_seq_max, params.kv_unified = self.n_seq + 1, True
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        self.ctx = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        self.batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=self.n_seq + 1, verbose=False)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model.model))
        if self.prefix:
            self.decode([(0, self.prefix, 0, [])])
        return self

    def __exit__(self, *exc):
        self.batch.close()
        self.ctx.close()
        self.model.close()

    def fork(self, seq: int) -> None:
        """Start sequence `seq` (1..n_seq) from the prefix, dropping whatever it held."""
        self.ctx.kv_cache_seq_rm(seq, -1, -1)
        if self.prefix:
            self.ctx.kv_cache_seq_cp(0, seq, 0, len(self.prefix))

    def decode(self, runs: list[tuple[int, list[int], int, list[int]]]) -> list[list[int]]:
        """Evaluate (sequence, tokens, first position, offsets whose logits are wanted) runs in one batch;
        returns, per run, the batch rows holding those logits."""
        self.batch.reset()
        b, rows = self.batch.batch, []
        for seq, tokens, start, wanted in runs:
            first, wanted = b.n_tokens, set(wanted)
            for offset, token in enumerate(tokens):
                row = first + offset
                b.token[row], b.pos[row], b.n_seq_id[row] = int(token), start + offset, 1
                b.seq_id[row][0] = seq
                b.logits[row] = offset in wanted
            b.n_tokens = first + len(tokens)
            rows.append([first + offset for offset in sorted(wanted)])
        self.ctx.decode(self.batch)
        return rows

    def logits(self, row: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.ctx.get_logits_ith(row), shape=(self.n_vocab,))


def sample(
    llm, prompt: list[int], max_tokens: int, stop_ids: set[int], temperature: float, top_p: float, seed: int
) -> list[int]:
    """Sampled tokens (the generation policy's temperature and top_p), reproducible for a seed."""
    llm.set_seed(seed)
    tokens = []
    for token in llm.generate(
        prompt, temp=temperature, top_p=top_p, top_k=0, min_p=0.0, repeat_penalty=1.0, reset=True
    ):
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


def masked_nll(gguf_path: Path, items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, int]:
    """Summed negative log-likelihood of the masked target tokens, and how many there were.

    The target of position i is token i+1 and counts when mask[i+1] is set, as in training. The
    shared prefix is evaluated once; the items' remaining tokens go through a batch at a time, logits
    kept only where a token is scored.
    """
    prefix = shared_prefix_length(items)
    longest = max(len(ids) for ids, _ in items) - prefix
    n_batch = max(512, longest)
    groups = list(_groups_within(items, prefix, n_batch))
    total, count = 0.0, 0
    with Sequences(gguf_path, items[0][0][:prefix], max(map(len, groups)), prefix + n_batch, n_batch) as run:
        for group in groups:
            runs = []
            for seq, (ids, mask) in enumerate(group, start=1):
                run.fork(seq)
                runs.append((seq, ids[prefix:], prefix, np.nonzero(mask[prefix + 1 :])[0].tolist()))
            for (ids, _), rows, (_, _, _, offsets) in zip(group, run.decode(runs), runs):
                if not rows:
                    continue
                logits = np.stack([run.logits(row) for row in rows]).astype(np.float64)
                peak = logits.max(-1)
                log_z = np.log(np.exp(logits - peak[:, None]).sum(-1)) + peak
                total += float((log_z - logits[np.arange(len(rows)), ids[prefix + 1 :][offsets]]).sum())
                count += len(rows)
    return total, count


def _groups_within(items, prefix: int, n_batch: int):
    """Consecutive groups of items whose tokens after the prefix fit in one batch (and in llama.cpp's sequences)."""
    group, size, most = [], 0, max_sequences()
    for ids, mask in items:
        length = len(ids) - prefix
        if group and (size + length > n_batch or len(group) == most):
            yield group
            group, size = [], 0
        group.append((ids, mask))
        size += length
    if group:
        yield group


def perplexity(gguf_path: Path, items: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    nll, count = masked_nll(gguf_path, items)
    return {"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count}
