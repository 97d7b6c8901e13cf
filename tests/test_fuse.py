"""fuse stage on the tiny model: fused logits equal base + adapter, quantized bases, lineage, bad input."""

from __future__ import annotations

import json
import shutil

from pipeline import contracts, disk, hashing, paths

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.models import llama
from mlx_lm.utils import quantize_model, save

import fuse
import model as model_stage
import prepare
from fixtures.tiny_model import build_tiny_model
from helpers import error_line, trained


def base_plus_adapter_logits(base_dir, tokens):

    model, _ = load(str(base_dir), adapter_path=str(paths.RUNS_DIR / "main" / "adapter"))
    return np.array(model(mx.array([tokens])))


def fused_logits(tokens):

    model, _ = load(str(paths.RUNS_DIR / "main" / "fused"))
    return np.array(model(mx.array([tokens])))


def test_fused_logits_equal_base_plus_adapter(project, tiny_model_dir):
    trained(tiny_model_dir)
    assert fuse.main([]) == 0
    tokens = list(range(5, 60))
    fused, reference = fused_logits(tokens), base_plus_adapter_logits(tiny_model_dir, tokens)
    np.testing.assert_allclose(fused, reference, atol=1e-4)

    plain, _ = load(str(tiny_model_dir))
    assert np.abs(np.array(plain(mx.array([tokens]))) - fused).max() > 1e-3  # the adapter really changed something


def test_artifacts_record_lineage_and_hashes(project, tiny_model_dir):
    trained(tiny_model_dir)
    assert fuse.main([]) == 0
    artifacts = contracts.read_json(paths.RUNS_DIR / "main" / "artifacts.json", "artifacts")["artifacts"]
    by_id = {a["id"]: a for a in artifacts}
    assert by_id["main/fused"]["parent"] == "main/adapter" and by_id["main/adapter"]["parent"] == "base"
    assert by_id["main/fused"]["sha256"] == hashing.sha256_tree(paths.RUNS_DIR / "main" / "fused")
    assert by_id["main/adapter"]["sha256"] == hashing.sha256_tree(paths.RUNS_DIR / "main" / "adapter")
    manifest = contracts.read_json(paths.RUNS_DIR / "main" / "fuse.manifest.json", "run_manifest")
    assert manifest["details"]["max_logit_difference"] < 1e-3


def test_quantized_base_is_dequantized_not_requantized(project, tiny_model_dir, tmp_path):

    model, tokenizer, config = load(str(tiny_model_dir), return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=4)
    quantized = tmp_path / "tiny-q4"
    save(quantized, tiny_model_dir, model, tokenizer, config)
    shutil.copy(tiny_model_dir / "chat_template.jinja", quantized / "chat_template.jinja")
    trained(quantized)
    assert fuse.main([]) == 0
    fused_config = json.loads((paths.RUNS_DIR / "main" / "fused" / "config.json").read_text())
    assert "quantization" not in fused_config
    tokens = list(range(5, 60))
    np.testing.assert_allclose(fused_logits(tokens), base_plus_adapter_logits(quantized, tokens), atol=1e-3)
    assert contracts.read_json(paths.RUNS_DIR / "main" / "fuse.manifest.json", "run_manifest")["details"][
        "base_was_quantized"
    ]


def test_missing_adapter_is_a_clear_error(project, tiny_model_dir, caplog):
    assert model_stage.main([f"model.source={tiny_model_dir}"]) == 0
    assert prepare.main([]) == 0
    assert fuse.main([]) == 2
    assert "has no trained adapter" in error_line(caplog) and "make train" in error_line(caplog)


def test_adapter_of_another_model_is_a_clear_error(project, tiny_model_dir, tmp_path, caplog):
    trained(tiny_model_dir)
    other = build_tiny_model(tmp_path / "other", seed=1)
    config = json.loads((other / "config.json").read_text())
    config.update(hidden_size=96, intermediate_size=192, head_dim=24)
    (other / "config.json").write_text(json.dumps(config))

    mx.save_safetensors(
        str(other / "model.safetensors"),
        dict(tree_flatten(llama.Model(llama.ModelArgs.from_dict(config)).parameters())),
    )
    assert model_stage.main([f"model.source={other}"]) == 0
    assert fuse.main([]) == 2
    line = error_line(caplog)
    assert "the adapter does not match the base model" in line and "fix:" in line
    assert not (paths.RUNS_DIR / "main" / "fused").exists()


def test_too_little_disk_is_refused_before_writing(project, tiny_model_dir, monkeypatch, caplog):
    trained(tiny_model_dir)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    assert fuse.main([]) == 2
    assert "is free" in error_line(caplog)
    assert not (paths.RUNS_DIR / "main" / "fused").exists()
