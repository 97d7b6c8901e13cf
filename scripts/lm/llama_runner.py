"""Running GGUF files in llama.cpp (through llama-cpp-python): greedy answers and masked perplexity.

Shared by quantize (export check) and eval (scoring GGUF artifacts), so both measure the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
from pathlib import Path

from pipeline import runtime
from pipeline.errors import PipelineError

import llama_cpp
import numpy as np
from llama_cpp import Llama, _internals

# llama.cpp logs every tensor it loads or quantizes; show its errors only, unless debugging.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def open_llama(gguf_path: Path, n_ctx: int, lora_path: Path | None = None):
    """A llama.cpp model for one sequence at a time; with `lora_path`, a LoRA adapter GGUF applied at scale 1
    (llama.cpp scales it by the adapter's alpha / rank)."""
    return Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=runtime.cpu_threads(),
        verbose=False,
        seed=0,
        lora_path=str(lora_path) if lora_path else None,
    )


def last_logits(llm, prompt: list[int]) -> np.ndarray:
    """The logits after the whole of `prompt` (the first greedy step's), as float32."""
    llm.reset()
    llm.eval(prompt)  # without logits_all, llama-cpp-python keeps no logits itself: read the context's
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float32)


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


# One context's KV cache holds at most this much (f16 keys and values), and at most this many tokens: in one
# cache shared by all sequences, every new token's attention runs over all its cells (other sequences' masked
# out), so a huge cache slows every step. A batch that needs more is decoded in groups, one after another;
# a single prompt and its answer may always use the whole trained context.
KV_CACHE_BYTES = 1 << 30
MAX_CONTEXT_TOKENS = 16384
# Tokens per perplexity batch: every scored token keeps a row of n_vocab logits.
NLL_BATCH_TOKENS = 512
# Spare KV cells in every context, beyond what its sequences need.
SPARE_CELLS = 64

DECODE_FAILURES = {1: "has no room in its KV cache", 2: "was aborted", -1: "rejected the batch as invalid"}


def max_sequences() -> int:
    """How many prompts one llama.cpp context can hold besides the shared prefix's sequence."""
    return llama_cpp.llama_max_parallel_sequences() - 1


def load_model(gguf_path: Path) -> _internals.LlamaModel:
    params = llama_cpp.llama_model_default_params()
    return _internals.LlamaModel(path_model=str(gguf_path), params=params, verbose=False)


@contextlib.contextmanager
def opened(gguf_path: Path, lora_path: Path | None = None):
    """(model, LoRA adapter or None): the GGUF loaded, with the adapter GGUF loaded onto it when given
    (Sequences applies it to its context at scale 1; llama.cpp scales by the adapter's alpha / rank)."""
    model, adapter = load_model(gguf_path), None
    try:
        if lora_path is not None:
            adapter = llama_cpp.llama_adapter_lora_init(model.model, str(lora_path).encode("utf-8"))
            if not adapter:
                raise PipelineError(
                    f"llama.cpp cannot load the LoRA adapter onto {Path(gguf_path).name}",
                    where=str(lora_path),
                    fix="pair the adapter GGUF with the base GGUF quantize wrote beside it",
                )
        yield model, adapter
    finally:
        if adapter:
            llama_cpp.llama_adapter_lora_free(adapter)
        model.close()


def metadata(model: _internals.LlamaModel, key: str) -> str | None:
    buffer = ctypes.create_string_buffer(256)
    if llama_cpp.llama_model_meta_val_str(model.model, key.encode(), buffer, len(buffer)) < 0:
        return None
    return buffer.value.decode()


def kv_bytes_per_token(model: _internals.LlamaModel) -> int:
    """Bytes one token takes in an f16 KV cache: keys and values of every layer's KV heads."""
    arch = metadata(model, "general.architecture") or "llama"
    head_dim = model.n_embd() // max(1, llama_cpp.llama_model_n_head(model.model))
    key = int(metadata(model, f"{arch}.attention.key_length") or head_dim)
    value = int(metadata(model, f"{arch}.attention.value_length") or head_dim)
    return 2 * llama_cpp.llama_model_n_layer(model.model) * llama_cpp.llama_model_n_head_kv(model.model) * (key + value)


def context_tokens(model: _internals.LlamaModel) -> int:
    """How many tokens one context may hold for a batch (the memory cap)."""
    return max(1, min(MAX_CONTEXT_TOKENS, KV_CACHE_BYTES // kv_bytes_per_token(model)))


def first_beyond_context(model: _internals.LlamaModel, lengths: list[int]) -> int | None:
    """The first sequence (by its length in positions) longer than the model's trained context, if any."""
    limit = model.n_ctx_train()
    return next((i for i, length in enumerate(lengths) if 0 < limit < length), None)


def groups_within(needs: list[int], room: int, most: int) -> list[list[int]]:
    """Consecutive groups of indices whose needs add up to at most `room` (or one index that alone needs
    more), at most `most` in a group."""
    groups, size = [[]], 0
    for index, need in enumerate(needs):
        if groups[-1] and (size + need > room or len(groups[-1]) == most):
            groups.append([])
            size = 0
        groups[-1].append(index)
        size += need
    return groups if groups[0] else []


def shared_prompt_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens all prompts share, leaving each at least one token of its own."""
    return max(0, min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1))


def greedy_batch(
    gguf_path: Path, prompts: list[list[int]], max_tokens: int, stop_ids: set[int], lora_path: Path | None = None
) -> list[list[int]]:
    """Greedy answers to many prompts, decoded together: one llama_decode per step for every unfinished
    prompt, as llama.cpp's batched example does (one prompt at a time, each step reads all weights
    for a single token). The prompts' common prefix is evaluated once. Prompts that do not fit one
    context together are decoded in groups, one after another, in the same context.

    Float GGUFs answer exactly as one prompt at a time does; for K-quants llama.cpp's CPU backend
    picks other kernels for a batch of tokens than for one, so a near-tie can go the other way.
    """
    if not prompts:
        return []
    shared = shared_prompt_prefix(prompts)
    tails = [prompt[shared:] for prompt in prompts]
    needs = [len(tail) + max_tokens for tail in tails]
    with opened(gguf_path, lora_path) as (model, adapter):
        check_answers_fit(model, gguf_path, prompts, max_tokens)
        groups = groups_within(needs, max(context_tokens(model), shared + max(needs)) - shared, max_sequences())
        n_ctx = shared + max(sum(needs[i] for i in group) for group in groups)
        n_batch = max(sum(len(tails[i]) for i in group) for group in groups)
        answers = []
        prefix = prompts[0][:shared]
        with Sequences(model, gguf_path, prefix, max(map(len, groups)), n_ctx, n_batch, adapter) as run:
            for group in groups:
                answers += greedy_group(run, [tails[i] for i in group], shared, max_tokens, stop_ids)
        return answers


def check_answers_fit(model, gguf_path: Path, prompts: list[list[int]], max_tokens: int) -> None:
    """Every prompt with an answer of max_tokens fits the model's trained context."""
    too_long = first_beyond_context(model, [len(prompt) + max_tokens for prompt in prompts])
    if too_long is not None:
        raise PipelineError(
            f"prompt {too_long + 1} of {len(prompts)} has {len(prompts[too_long])} tokens; with an answer of up to "
            f"{max_tokens} that is more than the {model.n_ctx_train()} tokens the model was trained for",
            where=str(gguf_path),
            fix="lower eval.max_tokens, or data.max_seq_length so that prepare drops or truncates the longest records",
        )


def greedy_group(run: Sequences, tails: list[list[int]], shared: int, max_tokens: int, stop_ids: set[int]):
    """Greedy answers to prompts that fit `run` together (`tails`: each prompt after the shared prefix)."""
    run.restart(len(tails))
    pending = [(seq, tail, shared) for seq, tail in enumerate(tails, start=1)]
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
    return [answers[seq] for seq in range(1, len(tails) + 1)]


class Sequences:
    """A llama.cpp context with several KV sequences: sequence 0 holds a prefix evaluated once, and
    sequences 1..n_seq start from a copy of it. One KV cache is shared by all sequences (kv_unified), so
    n_ctx must hold the prefix once plus every token of sequences 1..n_seq; n_batch, the most tokens one
    decode may carry."""

    def __init__(
        self, model, gguf_path: Path, prefix: list[int], n_seq: int, n_ctx: int, n_batch: int = 512, adapter=None
    ):
        self.model, self.gguf_path, self.prefix, self.n_seq = model, gguf_path, [int(t) for t in prefix], n_seq
        self.adapter = adapter
        self.n_ctx, self.n_batch = n_ctx + SPARE_CELLS, max(512, len(self.prefix), n_batch, n_seq)

    def __enter__(self):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = self.n_ctx, self.n_batch, 512
        params.n_seq_max, params.kv_unified = self.n_seq + 1, True
        params.n_threads = params.n_threads_batch = runtime.cpu_threads()
        self.ctx = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        if self.adapter:
            adapters, scales = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapter), (ctypes.c_float * 1)(1.0)
            if llama_cpp.llama_set_adapters_lora(self.ctx.ctx, adapters, 1, scales) != 0:
                self.ctx.close()
                raise PipelineError(
                    "llama.cpp cannot apply the LoRA adapter to a context",
                    where=str(self.gguf_path),
                    fix="pair the adapter GGUF with the base GGUF quantize wrote beside it",
                )
        # llama.cpp pads n_ctx and caps n_batch at the n_ctx asked for: keep what it chose.
        self.n_ctx, self.n_batch = llama_cpp.llama_n_ctx(self.ctx.ctx), llama_cpp.llama_n_batch(self.ctx.ctx)
        self.batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self.n_vocab = self.model.n_vocab()
        if self.prefix:
            self.decode([(0, self.prefix, 0, [])])
        return self

    def __exit__(self, *exc):
        self.batch.close()
        self.ctx.close()

    def restart(self, count: int) -> None:
        """Sequences 1..count start from the prefix; every token past the prefix, in any sequence, is dropped."""
        llama_cpp.llama_memory_seq_rm(self.ctx.memory, -1, len(self.prefix), -1)
        for seq in range(1, count + 1):
            self.ctx.kv_cache_seq_rm(seq, -1, -1)
            if self.prefix:
                self.ctx.kv_cache_seq_cp(0, seq, 0, len(self.prefix))

    def decode(self, runs: list[tuple[int, list[int], int, list[int]]]) -> list[list[int]]:
        """Evaluate (sequence, tokens, first position, offsets whose logits are wanted) runs in one batch;
        returns, per run, the batch rows holding those logits."""
        carried = sum(len(tokens) for _, tokens, _, _ in runs)
        if carried > self.n_batch:  # llama.cpp would abort the process (GGML_ASSERT), not return an error
            raise self.failure("cannot take so many tokens in one batch", runs)
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
        code = llama_cpp.llama_decode(self.ctx.ctx, self.batch.batch)
        if code != 0:
            raise self.failure(DECODE_FAILURES.get(code, "failed with a fatal error"), runs, code)
        return rows

    def failure(self, cause: str, runs, code: int | None = None) -> PipelineError:
        """Why llama.cpp could not decode `runs`, with the batch and context it happened to."""
        longest = max(start + len(tokens) for _, tokens, start, _ in runs)
        carried = sum(len(tokens) for _, tokens, _, _ in runs)
        returned = "" if code is None else f"; llama_decode returned {code}"
        return PipelineError(
            f"llama.cpp {cause} for {len(runs)} sequence{'s' * (len(runs) != 1)} of up to {longest} tokens "
            f"({carried} new in this batch; n_ctx {self.n_ctx}, n_batch {self.n_batch}{returned})",
            where=str(self.gguf_path),
            fix="lower eval.batch_size or eval.max_tokens; lm/llama_runner.py sizes the context, so report this line",
        )

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
    """Summed negative log-likelihood of the masked target tokens, and how many there were (item_nll, summed)."""
    per_item = item_nll(gguf_path, items)
    return sum(nll for nll, _ in per_item), sum(count for _, count in per_item)


def item_nll(
    gguf_path: Path, items: list[tuple[np.ndarray, np.ndarray]], lora_path: Path | None = None
) -> list[tuple[float, int]]:
    """Each item's summed negative log-likelihood of its masked target tokens, and how many there were.

    The target of position i is token i+1 and counts when mask[i+1] is set, as in training. The
    shared prefix is evaluated once; the items' remaining tokens go through a batch at a time (each batch
    in a context emptied past the prefix), logits kept only where a token is scored.
    """
    prefix = shared_prefix_length(items)
    tails = [len(ids) - prefix for ids, _ in items]
    groups = groups_within(tails, max(NLL_BATCH_TOKENS, max(tails)), max_sequences())
    n_batch = max(sum(tails[i] for i in group) for group in groups)
    per_item: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    with opened(gguf_path, lora_path) as (model, adapter):
        check_items_fit(model, gguf_path, items)
        n_seq, n_ctx = max(map(len, groups)), prefix + n_batch
        with Sequences(model, gguf_path, items[0][0][:prefix], n_seq, n_ctx, n_batch, adapter) as run:
            for group in groups:
                for index, scored in zip(group, group_nll(run, [items[i] for i in group], prefix)):
                    per_item[index] = scored
    return per_item


def check_items_fit(model, gguf_path: Path, items: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Every scored record fits the model's trained context."""
    too_long = first_beyond_context(model, [len(ids) for ids, _ in items])
    if too_long is not None:
        raise PipelineError(
            f"record {too_long + 1} of {len(items)} has {len(items[too_long][0])} tokens, more than the "
            f"{model.n_ctx_train()} the model was trained for",
            where=str(gguf_path),
            fix=f"lower data.max_seq_length to at most {model.n_ctx_train()} so that prepare drops or truncates it",
        )


def group_nll(run: Sequences, group: list[tuple[np.ndarray, np.ndarray]], prefix: int) -> list[tuple[float, int]]:
    """Per item of a group that fits one batch of `run`: the summed NLL and count of its scored tokens."""
    run.restart(len(group))
    runs = [
        (seq, ids[prefix:], prefix, np.nonzero(mask[prefix + 1 :])[0].tolist())
        for seq, (ids, mask) in enumerate(group, 1)
    ]
    out = []
    for (ids, _), rows, (_, _, _, offsets) in zip(group, run.decode(runs), runs):
        if not rows:
            out.append((0.0, 0))
            continue
        logits = np.stack([run.logits(row) for row in rows]).astype(np.float64)
        peak = logits.max(-1)
        log_z = np.log(np.exp(logits - peak[:, None]).sum(-1)) + peak
        out.append((float((log_z - logits[np.arange(len(rows)), ids[prefix + 1 :][offsets]]).sum()), len(rows)))
    return out


def perplexity(gguf_path: Path, items: list[tuple[np.ndarray, np.ndarray]], lora_path: Path | None = None) -> dict:
    """Token-weighted loss and perplexity over the items, and each item's [summed NLL, scored tokens]."""
    per_item = item_nll(gguf_path, items, lora_path)
    nll, count = sum(n for n, _ in per_item), sum(c for _, c in per_item)
    return {"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count, "per_item": per_item}
