"""model stage: GGUF → MLX conversion (exact on a tiny GGUF), bad sources, and the real default model."""

from __future__ import annotations

import json

from pipeline import contracts, paths
from pipeline.manifest import output_path

import mlx.core as mx
import numpy as np
import pytest
from llama_cpp import Llama
from mlx_lm import generate, load
from mlx_lm.utils import load_tokenizer

import model as model_stage
from fixtures.tiny_gguf import write_tiny_gguf

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


@pytest.mark.parametrize("damage", ["header-only", "truncated"])
def test_corrupt_gguf_is_a_clear_error(project, tmp_path, tiny_model_dir, damage, caplog):
    bad = tmp_path / "broken.gguf"
    if damage == "header-only":
        bad.write_bytes(b"GGUF" + b"\x00" * 64)
    else:
        whole = write_tiny_gguf(tiny_model_dir, tmp_path / "whole.gguf").read_bytes()
        bad.write_bytes(whole[: len(whole) // 2])
    assert model_stage.main([f"model.source={bad}", f"model.cache_dir={tmp_path / 'cache'}"]) == 2
    assert "cannot read the GGUF file" in caplog.text
    assert not paths.MODEL_MANIFEST.exists()


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
