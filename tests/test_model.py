"""model stage: GGUF → MLX conversion (exact on a tiny GGUF), bad sources, the converter's crash isolation and
temp-folder clean-up, and the real default model. Damaged GGUFs are in test_gguf_check.py."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal

from pipeline import contracts, isolate, paths, runtime
from pipeline.errors import PipelineError
from pipeline.manifest import output_path

import mlx.core as mx
import numpy as np
import pytest
from llama_cpp import Llama
from mlx_lm import generate, load
from mlx_lm.utils import load_tokenizer

import model as model_stage
from fixtures.tiny_gguf import patch_bytes, tensor_info_offsets, write_tiny_gguf
from helpers import error_line
from lm.gguf_check import check_gguf

TEXTS = ["Hello world! 12345", 'json tool call: {"name": "weather"}', "  two  spaces\nand a newline"]


def convert(tmp_path, tiny_model_dir, **kwargs):
    gguf_path = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf", **kwargs)
    assert model_stage.main([f"model.source={gguf_path}", "model.cache_dir=" + str(tmp_path / "cache")]) == 0
    manifest = contracts.read_json(paths.MODEL_MANIFEST, "run_manifest")
    return output_path(manifest, "model"), manifest


def logits(model_dir, text):

    model, tokenizer = load(str(model_dir))
    return tokenizer.encode(text), np.array(model(mx.array([tokenizer.encode(text)])))


def test_float32_gguf_converts_exactly(project, tmp_path, tiny_model_dir):
    model_dir, manifest = convert(tmp_path, tiny_model_dir, quantize_q8=False)
    for text in TEXTS:
        tokens, converted = logits(model_dir, text)
        original_tokens, original = logits(tiny_model_dir, text)
        assert tokens == original_tokens
        np.testing.assert_array_equal(converted, original)
    assert manifest["details"]["source_kind"] == "gguf"
    assert manifest["inputs"][0]["role"] == "source"


def test_q8_gguf_converts_within_quantization_error(project, tmp_path, tiny_model_dir):
    model_dir, _ = convert(tmp_path, tiny_model_dir, quantize_q8=True)
    _, converted = logits(model_dir, TEXTS[0])
    _, original = logits(tiny_model_dir, TEXTS[0])
    assert np.abs(converted - original).max() < 0.05 * np.abs(original).max()
    assert not np.array_equal(converted, original)  # the quantized path really ran


def test_converted_folder_has_everything_mlx_lm_needs(project, tmp_path, tiny_model_dir):
    model_dir, _ = convert(tmp_path, tiny_model_dir, quantize_q8=False)
    names = {p.name for p in model_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert json.loads((model_dir / "config.json").read_text())["rope_theta"] == 10000.0


def test_second_run_reuses_the_cached_conversion(project, tmp_path, tiny_model_dir, caplog):
    model_dir, _ = convert(tmp_path, tiny_model_dir, quantize_q8=False)
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert (
        model_stage.main([f"model.source={tmp_path / 'tiny.gguf'}", "model.cache_dir=" + str(tmp_path / "cache")]) == 0
    )
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_local_model_folder_is_used_in_place(project, tiny_model_dir):
    assert model_stage.main([f"model.source={tiny_model_dir}"]) == 0
    manifest = contracts.read_json(paths.MODEL_MANIFEST, "run_manifest")
    assert output_path(manifest, "model") == tiny_model_dir
    assert manifest["details"]["parameters"] > 0


def test_unsupported_architecture_names_the_supported_ones(project, tmp_path, tiny_model_dir, caplog):
    gguf_path = write_tiny_gguf(tiny_model_dir, tmp_path / "other.gguf", arch="gpt2")
    assert model_stage.main([f"model.source={gguf_path}", f"model.cache_dir={tmp_path / 'cache'}"]) == 2
    assert "architecture 'gpt2' is not supported" in caplog.text and "llama" in caplog.text
    assert not paths.MODEL_MANIFEST.exists()
    assert not any((tmp_path / "cache").glob("*")), "a half-converted folder was left behind"


def test_a_converter_crash_is_one_error_line_and_leaves_no_temp_folder(
    project, tmp_path, tiny_model_dir, monkeypatch, caplog
):
    """A damage the check does not foresee (here: the check switched off) kills only the converter's process."""
    bad = write_tiny_gguf(tiny_model_dir, tmp_path / "crashes-mlx.gguf")
    patch_bytes(bad, tensor_info_offsets(bad)["token_embd.weight"]["name"], "Q", 2**40)  # mx.load: SIGSEGV
    monkeypatch.setattr(model_stage, "check_gguf", lambda path, where: None)
    cache = tmp_path / "cache"
    assert model_stage.main([f"model.source={bad}", f"model.cache_dir={cache}"]) == 2
    line = error_line(caplog)
    assert line.startswith(f"error: {bad}: the GGUF converter crashed (SIGSEGV) -- fix: the file is corrupt"), line
    assert not any(cache.iterdir()), "the temp folder of the crashed conversion was left behind"


def cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("model.safetensors", cut_in_half, "the weights file is damaged (Error while deserializing header: incomplete"),
        ("model.safetensors", lambda data: b"\xff" * 16 + data[16:], "the weights file is damaged (Error while"),
        ("config.json", lambda data: b"{not json", "not valid JSON"),
    ],
)
def test_damaged_file_in_a_model_folder_is_one_error_line(
    project, tmp_path, tiny_model_dir, name, damage, message, caplog
):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "user-model")
    (folder / name).write_bytes(damage((folder / name).read_bytes()))
    assert model_stage.main([f"model.source={folder}"]) == 2
    line = error_line(caplog)
    assert line.startswith(f"error: {folder / name}: {message}") and " -- fix: " in line, line
    assert not paths.MODEL_MANIFEST.exists()


def test_isolated_call_runs_in_another_process_with_the_fast_blas():
    assert isolate.call(os.getpid, name="getpid", where="test", fix="-") != os.getpid()
    child_blas = isolate.call(runtime.blas_summary, name="blas", where="test", fix="-")
    assert child_blas["name"] == runtime.blas_summary()["name"]


def test_isolated_call_turns_a_fatal_signal_into_a_pipeline_error():
    with pytest.raises(PipelineError) as raised:
        isolate.call(signal.raise_signal, signal.SIGSEGV, name="the tool", where="some.file", fix="try another")
    assert raised.value.line() == "some.file: the tool crashed (SIGSEGV) -- fix: try another"


def test_isolated_call_raises_what_the_child_raised(tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(PipelineError) as in_process:
        check_gguf(missing, "here")
    with pytest.raises(PipelineError) as in_child:
        isolate.call(check_gguf, missing, "here", name="check", where="test", fix="-")
    assert in_child.value.line() == in_process.value.line()
    with pytest.raises(ValueError, match="invalid literal") as raised:
        isolate.call(int, "x", name="int", where="test", fix="-")
    assert isinstance(raised.value.__cause__, isolate.ChildTraceback)
    assert "Traceback" in str(raised.value.__cause__)
    with pytest.raises(isolate.IsolatedError, match="exited with status 3"):
        isolate.call(os._exit, 3, name="exit", where="test", fix="-")


def test_a_worker_runs_calls_in_one_process_and_a_new_one_after_a_crash():
    with isolate.Worker({"PIPELINE_TEST_MARK": "worker"}) as worker:
        first = worker.call(os.getpid, name="getpid", where="test", fix="-")
        assert worker.call(os.getpid, name="getpid", where="test", fix="-") == first != os.getpid()
        assert worker.call(os.getenv, "PIPELINE_TEST_MARK", name="env", where="test", fix="-") == "worker"
        with pytest.raises(PipelineError, match=r"the tool crashed \(SIGSEGV\)"):
            worker.call(signal.raise_signal, signal.SIGSEGV, name="the tool", where="some.file", fix="-")
        with pytest.raises(ValueError, match="invalid literal"):  # an exception leaves the process as it is
            worker.call(int, "x", name="int", where="test", fix="-")
        second = worker.call(os.getpid, name="getpid", where="test", fix="-")
        assert second not in (first, os.getpid())
        with pytest.raises(EOFError):  # a call reads /dev/null, not the worker's control pipe
            worker.call(input, name="stdin", where="test", fix="-")
        assert worker.call(os.getpid, name="getpid", where="test", fix="-") == second
    assert worker.child is None  # closed: no process left


def leftover_of_a_killed_conversion(cache, gguf_name="tiny"):
    """What contracts.atomic_dir leaves in the cache folder when the process converting is killed (kill -9)."""
    leftover = cache / f".{gguf_name}-float32-0123456789abcdef-v1.k9x2_abc.tmp"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half written")
    return leftover


def test_temp_folders_of_a_killed_conversion_are_removed(project, tmp_path, tiny_model_dir):
    cache = tmp_path / "cache"
    leftover = leftover_of_a_killed_conversion(cache)
    unrelated = cache / ".someone-elses.tmp"
    unrelated.mkdir()
    convert(tmp_path, tiny_model_dir, quantize_q8=False)
    assert not leftover.exists()
    assert unrelated.exists(), "only the conversion temp folders are removed"


def test_temp_folders_are_kept_while_another_process_converts_into_the_cache(project, tmp_path, tiny_model_dir):
    cache = tmp_path / "cache"
    leftover = leftover_of_a_killed_conversion(cache)
    other_conversion = os.open(cache, os.O_RDONLY)  # holds the cache folder's lock like a running conversion
    try:
        fcntl.flock(other_conversion, fcntl.LOCK_SH)
        convert(tmp_path, tiny_model_dir, quantize_q8=False)
        assert leftover.exists(), "a temp folder that may be in use was removed"
    finally:
        os.close(other_conversion)


@pytest.mark.parametrize(
    "source, message",
    [
        ("builtin:nope", "no builtin model named 'nope'"),
        ("missing/file.gguf", "GGUF file missing/file.gguf not found"),
        ("./not-a-folder", "is neither a local folder"),
    ],
)
def test_bad_sources_fail_with_one_line(project, source, message, caplog):
    assert model_stage.main([f"model.source={source}"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and "fix:" in errors[0]


def test_folder_without_weights_is_rejected(project, tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    assert model_stage.main([f"model.source={tmp_path / 'empty'}"]) == 2
    assert "is not a Hugging Face/MLX model folder" in caplog.text


@pytest.mark.slow
def test_default_model_answers_paris_with_rope_theta_100000(project):

    assert model_stage.main([]) == 0
    model_dir = output_path(contracts.read_json(paths.MODEL_MANIFEST, "run_manifest"), "model")
    assert json.loads((model_dir / "config.json").read_text())["rope_theta"] == 100000.0
    model, tokenizer = load(str(model_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    answer = generate(model, tokenizer, prompt, max_tokens=30)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_default_tokenizer_matches_llama_cpp(project):

    assert model_stage.main([]) == 0
    model_dir = output_path(contracts.read_json(paths.MODEL_MANIFEST, "run_manifest"), "model")
    tokenizer = load_tokenizer(model_dir)
    reference = Llama(str(model_stage.builtin_gguf("smollm2-135m-instruct")), vocab_only=True, verbose=False)
    samples = TEXTS + ["Ünïcödé 日本語 🙂", "<|im_start|>user\nHi<|im_end|>", "I'm sure they'll do 3.14159 x 2048"]
    for text in samples:
        assert tokenizer.encode(text) == reference.tokenize(text.encode(), add_bos=False, special=True), text
