"""quantize stage on the tiny model: GGUF written right (logits equal MLX in llama.cpp), K-quants,
MLX quantized models, the export check, serving files, artifacts lineage and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline import config, contracts, hashing, paths
from pipeline.errors import PipelineError

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from llama_cpp import Llama
from mlx_lm import load

import fuse
import quantize
from helpers import trained
from lm import gguf_header
from lm import hf_to_gguf as gguf_export

SMALL = [
    "quantize.mlx=[affine-4]",
    "quantize.check_prompts=2",
    "quantize.check_max_tokens=12",
    "quantize.perplexity_records=4",
]


@pytest.fixture
def fused_project(project, tiny_model_dir):
    trained(tiny_model_dir)
    assert fuse.main([]) == 0
    return project


def quantized_dir() -> Path:
    return paths.RUNS_DIR / "main" / "quantized"


def llama_logits(gguf_path: Path, tokens: list[int]) -> np.ndarray:

    llm = Llama(model_path=str(gguf_path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens)
    return np.asarray(llm.scores[: len(tokens)])


def test_float32_gguf_gives_the_mlx_logits_in_llama_cpp(tiny_model_dir, tmp_path):

    path = tmp_path / "tiny-f32.gguf"
    info = gguf_export.write_gguf(tiny_model_dir, path, float_type="float32", chat_template="{{ x }}", name="tiny")
    assert info["architecture"] == "llama" and info["pre_tokenizer"] == "gpt-2"
    tokens = list(range(3, 40))
    model, _ = load(str(tiny_model_dir))
    expected = np.array(model(mx.array([tokens]))[0])
    np.testing.assert_allclose(llama_logits(path, tokens), expected, atol=2e-3, rtol=1e-3)
    header = gguf_header.read_header(path)
    assert header["parameters"] == sum(v.size for v in mx.load(str(tiny_model_dir / "model.safetensors")).values())


def test_q_and_k_rows_must_be_permuted_for_llama_cpp(tiny_model_dir, tmp_path, monkeypatch):
    """The check above can fail: without llama.cpp's q/k row order the logits are wrong."""

    monkeypatch.setattr(gguf_export, "permute_qk", lambda w, n_head: w)
    path = tmp_path / "unpermuted.gguf"
    gguf_export.write_gguf(tiny_model_dir, path, float_type="float32", chat_template=None, name="tiny")
    tokens = list(range(3, 40))
    model, _ = load(str(tiny_model_dir))
    assert np.abs(llama_logits(path, tokens) - np.array(model(mx.array([tokens]))[0])).max() > 1e-2


def test_quantize_writes_checked_artifacts_with_lineage(fused_project):
    assert quantize.main([*SMALL, "quantize.gguf_types=[Q4_K_M, Q8_0]", "quantize.gguf_float=float32"]) == 0
    out = quantized_dir()
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "base-Q4_K_M.gguf",
        "base-Q8_0.gguf",
        "base-f32.gguf",
        "main-Q4_K_M.gguf",
        "main-Q8_0.gguf",
        "main-f32.gguf",
        "main-lora.gguf",
        "main-peft",
        "mlx-affine-4bit-g64",
    ]
    assert gguf_header.read_header(out / "main-Q4_K_M.gguf")["quantization"] == "Q4_K_M"
    assert gguf_header.read_header(out / "main-Q8_0.gguf")["quantization"] == "Q8_0"

    artifacts = contracts.read_json(paths.RUNS_DIR / "main" / "artifacts.json", "artifacts")["artifacts"]
    by_id = {a["id"]: a for a in artifacts}
    assert by_id["main/main-f32.gguf"]["parent"] == "main/fused"
    assert by_id["main/main-Q4_K_M.gguf"]["parent"] == "main/main-f32.gguf"
    assert by_id["main/mlx-affine-4bit-g64"]["parent"] == "main/fused"
    assert by_id["main/base-f32.gguf"]["parent"] == "base" and by_id["main/base-f32.gguf"]["kind"] == "gguf-base"
    assert by_id["main/base-Q4_K_M.gguf"]["parent"] == "main/base-f32.gguf"
    assert by_id["main/main-lora.gguf"]["parent"] == by_id["main/main-peft"]["parent"] == "main/adapter"
    assert (by_id["main/main-lora.gguf"]["kind"], by_id["main/main-peft"]["kind"]) == ("gguf-adapter", "peft")
    for artifact in artifacts:
        path = paths.resolve(artifact["path"])
        digest = hashing.sha256_tree(path) if path.is_dir() else hashing.sha256_file(path)
        assert artifact["sha256"] == digest, artifact["id"]

    details = contracts.read_json(paths.RUNS_DIR / "main" / "quantize.manifest.json", "run_manifest")["details"]
    assert details["export_check"]["matching"] == details["export_check"]["prompts"] == 2
    table = details["perplexity"]["by_type"]
    assert set(table) == {"f32", "Q4_K_M", "Q8_0"} and table["f32"]["change_vs_float"] == 0
    assert abs(table["Q8_0"]["ratio_vs_float"] - 1) < 0.05
    check = details["adapter"]["gguf"]["check"]
    assert check["matching"] == check["prompts"] == 2 and all(r["match"] for r in check["results"])
    assert 0 <= check["max_logit_difference"] <= check["tolerance"]
    assert details["adapter"]["peft"]["round_trip"] == "equal"


def test_adapter_gguf_that_does_not_answer_like_the_fused_gguf_stops_the_stage(fused_project, caplog, monkeypatch):
    from lm import adapter_export

    monkeypatch.setattr(adapter_export.LoraAdapter, "alpha", property(lambda self: 50 * self.scale * self.rank))
    assert (
        quantize.main(
            [*SMALL, "quantize.gguf_types=[]", "quantize.gguf_float=float32", "quantize.adapter_exports=[gguf]"]
        )
        == 2
    )
    assert "the adapter GGUF on the base GGUF does not answer like the fused GGUF: check prompt 0" in caplog.text
    assert not quantized_dir().exists()
    artifacts = contracts.read_json(paths.RUNS_DIR / "main" / "artifacts.json", "artifacts")["artifacts"]
    assert {a["stage"] for a in artifacts} == {"model", "train", "fuse"}


def test_no_adapter_exports_when_none_are_asked_for(fused_project):
    assert quantize.main([*SMALL, "quantize.gguf_types=[]", "quantize.adapter_exports=[]"]) == 0
    assert sorted(p.name for p in quantized_dir().iterdir()) == ["main-f16.gguf", "mlx-affine-4bit-g64"]


def test_mlx_quantized_model_loads_and_is_quantized(fused_project):

    assert (
        quantize.main(
            [
                *SMALL,
                "quantize.mlx=[affine-8, mixed_3_6]",
                "quantize.gguf_types=[]",
                "quantize.gguf_float=none",
            ]
        )
        == 0
    )
    for folder, bits in (("mlx-affine-8bit-g64", 8), ("mlx-mixed_3_6-g64", None)):
        config = json.loads((quantized_dir() / folder / "config.json").read_text())
        assert "quantization" in config and (bits is None or config["quantization"]["bits"] == bits)
        model, _ = load(str(quantized_dir() / folder))
        assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        assert np.isfinite(np.array(model(mx.array([[1, 2, 3]])))).all()
    assert not list(quantized_dir().glob("*.gguf"))


def test_export_check_reports_the_first_differing_token(fused_project, tiny_model_dir, tmp_path):
    """A GGUF of another model (the untrained base) must fail the check, naming where it diverges."""
    other = tmp_path / "base.gguf"
    gguf_export.write_gguf(tiny_model_dir, other, float_type="float32", chat_template=None, name="base")
    contract = contracts.read_json(paths.DATA_DIR / "data_contract.json", "data_contract")
    cfg = _quantize_cfg(["quantize.check_prompts=3", "quantize.check_max_tokens=16"])
    with pytest.raises(PipelineError, match="differs at generated token"):
        quantize.export_check(paths.RUNS_DIR / "main" / "fused", other, contract, cfg.quantize)
    warned = quantize.export_check(
        paths.RUNS_DIR / "main" / "fused", other, contract, _quantize_cfg(["quantize.on_mismatch=warn"]).quantize
    )
    assert warned["matching"] < warned["prompts"] and warned["results"][0]["first_difference"]


def _quantize_cfg(overrides):

    return config.load_config(overrides)


@pytest.mark.parametrize(
    "override, message",
    [
        ("quantize.gguf_types=[Q9_Z]", "llama.cpp does not know the quantization type Q9_Z"),
        ("quantize.mlx=[affine-3]", "got 'affine-3'"),
        ("quantize.gguf_float=none", "but quantize.gguf_float is none"),
    ],
)
def test_bad_settings_fail_before_writing(fused_project, caplog, override, message):
    assert quantize.main([override]) == 2
    assert message in caplog.text
    assert not quantized_dir().exists()


def test_missing_fused_model_is_one_clear_error(project, caplog):
    assert quantize.main([]) == 2
    assert "has no fused model" in caplog.text and "make fuse" in caplog.text


def test_too_little_disk_is_refused_first(fused_project, monkeypatch, caplog):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    assert quantize.main(SMALL) == 2
    assert "free" in caplog.text and not quantized_dir().exists()


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(PipelineError, match="supported: llama, mistral"):
        gguf_export.check_architecture({"model_type": "gemma3"}, "config.json")


def test_failing_check_keeps_nothing(fused_project, monkeypatch):
    def diverging(*args, **kwargs):
        raise PipelineError("the float GGUF does not answer like the fused MLX model", where="x", fix="y")

    monkeypatch.setattr(quantize, "export_check", diverging)
    assert quantize.main(SMALL) == 2
    assert not quantized_dir().exists()
    artifacts = contracts.read_json(paths.RUNS_DIR / "main" / "artifacts.json", "artifacts")["artifacts"]
    assert {a["stage"] for a in artifacts} == {"model", "train", "fuse"}
