"""lm.gguf_check: a damaged GGUF is one error line from the model stage, before any native code reads it."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from pipeline import paths
from pipeline.errors import PipelineError

import pytest

import model as model_stage
from fixtures.tiny_gguf import patch_bytes, tensor_info_offsets, write_tiny_gguf
from helpers import error_line
from lm.gguf_check import check_gguf, parse_header


@pytest.fixture(scope="module")
def whole_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "whole.gguf")


def cut_to(size_of):
    def damage(bad: Path, model_dir: Path) -> None:
        bad.write_bytes(bad.read_bytes()[: size_of(bad)])

    return damage


def overwrite(field: str, fmt: str, value, tensor: str = "token_embd.weight", extra: int = 0):
    """Overwrite one field of a tensor's entry in the tensor list (extra: bytes further, e.g. the second dim)."""

    def damage(bad: Path, model_dir: Path) -> None:
        patch_bytes(bad, tensor_info_offsets(bad)[tensor][field] + extra, fmt, value)

    return damage


def overwrite_last_offset(bad: Path, model_dir: Path) -> None:
    last = max(tensor_info_offsets(bad).values(), key=lambda entry: entry["data"])
    patch_bytes(bad, last["offset"], "Q", 10**9)


def written_without(*names: str):
    def damage(bad: Path, model_dir: Path) -> None:
        write_tiny_gguf(model_dir, bad, drop=names)

    return damage


DAMAGES = {
    "empty file": (cut_to(lambda bad: 0), "the GGUF file is empty (0 bytes)"),
    "bad magic": (lambda bad, _: patch_bytes(bad, 0, "4s", b"GGUX"), "not a GGUF file"),
    "unsupported version": (lambda bad, _: patch_bytes(bad, 4, "I", 99), "GGUF version 99 is not supported"),
    "cut in the metadata": (cut_to(lambda bad: 200), "past the end of the file (200 bytes) in metadata entry 5"),
    "cut in the tensor list": (
        cut_to(lambda bad: tensor_info_offsets(bad)["token_embd.weight"]["dims"] + 4),
        "in the tensor list (tensor 1 of 20)",
    ),
    "cut in the tensor data": (
        cut_to(lambda bad: bad.stat().st_size - 100),
        "the tensor output_norm.weight's data ends at byte",
    ),
    "data offset past the end": (overwrite_last_offset, "output_norm.weight's data ends at byte 1,000,"),
    "tensor name length overwritten": (overwrite("name", "Q", 2**40), "in the tensor list (tensor 1 of 20)"),
    "too many dimensions": (overwrite("n_dims", "I", 5), "token_embd.weight has 5 dimensions"),
    "wrong shape": (
        overwrite("dims", "Q", 500, extra=8),
        "token_embd.weight has the shape 500x64, where the metadata implies 512x64",
    ),
    "unknown type id": (overwrite("type", "I", 99, "blk.0.attn_norm.weight"), "unknown type id 99"),
    "type the converter cannot read": (
        overwrite("type", "I", 24, "blk.0.attn_norm.weight"),
        "blk.0.attn_norm.weight is I8, which the converter cannot dequantize",
    ),
    "missing tensor": (written_without("blk.1.ffn_up.weight"), "lacks the tensor blk.1.ffn_up.weight"),
    "missing metadata key": (written_without("llama.feed_forward_length"), "has no llama.feed_forward_length"),
    "missing vocabulary": (written_without("tokenizer.ggml.tokens"), "has no tokenizer.ggml.tokens"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_gguf_is_one_error_line(project, tmp_path, whole_gguf, tiny_model_dir, damage, caplog):
    bad = tmp_path / "damaged.gguf"
    shutil.copy(whole_gguf, bad)
    make_damage, message = DAMAGES[damage]
    make_damage(bad, tiny_model_dir)
    cache = tmp_path / "cache"
    assert model_stage.main([f"model.source={bad}", f"model.cache_dir={cache}"]) == 2
    line = error_line(caplog)
    assert line.startswith(f"error: {bad}: ") and message in line and " -- fix: " in line, line
    assert not paths.MODEL_MANIFEST.exists()
    assert not cache.exists() or not any(cache.iterdir()), "a temp or converted folder was left behind"


def test_the_tiny_and_the_default_gguf_pass_quickly(whole_gguf):
    check_gguf(whole_gguf, "tiny")
    default = model_stage.builtin_gguf("smollm2-135m-instruct")
    start = time.perf_counter()
    check_gguf(default, "default")
    assert time.perf_counter() - start < 1.0  # measured 0.05 s: the header only, no tensor data
    assert len(parse_header(default).tensors) == 272


def test_every_cut_in_the_header_is_a_pipeline_error(whole_gguf, tmp_path):
    data = whole_gguf.read_bytes()
    header_end = parse_header(whole_gguf).data_start
    bad = tmp_path / "cut.gguf"
    for size in range(0, header_end, 97):
        bad.write_bytes(data[:size])
        with pytest.raises(PipelineError, match="fix: "):
            check_gguf(bad, "cut")


def test_random_header_damage_is_a_pipeline_error_or_harmless(whole_gguf, tmp_path):
    """Whatever the bytes, the check raises only PipelineError; what it accepts still parses to the same tensors."""
    data = whole_gguf.read_bytes()
    header = parse_header(whole_gguf)
    rng = random.Random(0)
    bad = tmp_path / "flipped.gguf"
    rejected = 0
    for _ in range(300):
        damaged = bytearray(data)
        at, length = rng.randrange(header.data_start - 8), rng.choice((1, 8))
        damaged[at : at + length] = rng.randbytes(length)
        bad.write_bytes(bytes(damaged))
        try:
            check_gguf(bad, "flipped")
        except PipelineError:
            rejected += 1
            continue
        assert [t.shape for t in parse_header(bad).tensors] == [t.shape for t in header.tensors]
    assert rejected > 100  # most damage to a header is caught (measured: about 80%)
