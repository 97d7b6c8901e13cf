"""lm.adapter_export on the tiny model: the GGUF LoRA adapter gives MLX's base + adapter logits in
llama.cpp (and would not without the q/k row order or the right alpha), the PEFT folder holds MLX's
factors transposed under PEFT's names, and DoRA is skipped with a reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.errors import PipelineError

import mlx.core as mx
import numpy as np
import pytest
from llama_cpp import Llama
from mlx_lm import load
from safetensors.numpy import load_file, save_file

from lm import adapter_export
from lm import hf_to_gguf as gguf_export

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")
RANK, SCALE = 4, 2.0
TOKENS = list(range(3, 40))


@pytest.fixture(scope="module")
def random_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """An MLX LoRA adapter on the tiny model's last layer with factors large enough to move the logits."""
    out = tmp_path_factory.mktemp("adapter")
    weights = mx.load(str(tiny_model_dir / "model.safetensors"))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    layer = config["num_hidden_layers"] - 1
    rng = np.random.default_rng(0)
    tensors = {}
    for module in MODULES:
        out_dim, in_dim = weights[f"model.layers.{layer}.{module}.weight"].shape
        tensors[f"model.layers.{layer}.{module}.lora_a"] = rng.normal(0, 0.2, (in_dim, RANK)).astype(np.float32)
        tensors[f"model.layers.{layer}.{module}.lora_b"] = rng.normal(0, 0.2, (RANK, out_dim)).astype(np.float32)
    save_file(tensors, str(out / "adapters.safetensors"))
    adapter_config = {
        "fine_tune_type": "lora",
        "num_layers": 1,
        "lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0, "keys": [f"{m}" for m in MODULES]},
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out


@pytest.fixture(scope="module")
def base_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base-gguf") / "base-f32.gguf"
    gguf_export.write_gguf(tiny_model_dir, path, float_type="float32", chat_template=None, name="tiny")
    return path


def llama_logits(gguf_path: Path, lora_path: Path) -> np.ndarray:
    llm = Llama(model_path=str(gguf_path), lora_path=str(lora_path), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(TOKENS)
    return np.asarray(llm.scores[: len(TOKENS)])


def mlx_logits(model_dir: Path, adapter_dir: Path | None) -> np.ndarray:
    model, _ = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    return np.array(model(mx.array([TOKENS]))[0])


def write_adapter_gguf(adapter_dir: Path, model_dir: Path, out: Path) -> Path:
    adapter = adapter_export.read_mlx_adapter(adapter_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert adapter_export.write_gguf_adapter(adapter, out, config, "llama", "tiny-lora") == 2 * len(MODULES)
    return out


def test_gguf_adapter_on_the_base_gguf_gives_mlx_base_plus_adapter_in_llama_cpp(
    tiny_model_dir, random_adapter, base_gguf, tmp_path
):
    lora = write_adapter_gguf(random_adapter, tiny_model_dir, tmp_path / "tiny-lora.gguf")
    expected = mlx_logits(tiny_model_dir, random_adapter)
    assert np.abs(expected - mlx_logits(tiny_model_dir, None)).max() > 0.1  # the adapter really matters
    np.testing.assert_allclose(llama_logits(base_gguf, lora), expected, atol=5e-3, rtol=1e-3)
    header = gguf_export_header(lora)
    assert header["general.type"] == "adapter" and header["adapter.type"] == "lora"
    assert header["adapter.lora.alpha"] == pytest.approx(SCALE * RANK)


@pytest.mark.parametrize("broken", ["no q/k row order", "alpha of rank 1"])
def test_gguf_adapter_check_can_fail(tiny_model_dir, random_adapter, base_gguf, tmp_path, monkeypatch, broken):
    """The test above can fail: without llama.cpp's q/k row order, or with alpha not scale * rank, the
    logits are wrong."""
    if broken == "no q/k row order":
        monkeypatch.setattr(adapter_export, "permute_qk", lambda w, n_head: w)
    else:
        monkeypatch.setattr(adapter_export.LoraAdapter, "alpha", property(lambda self: self.scale))
    lora = write_adapter_gguf(random_adapter, tiny_model_dir, tmp_path / "broken-lora.gguf")
    assert np.abs(llama_logits(base_gguf, lora) - mlx_logits(tiny_model_dir, random_adapter)).max() > 0.1


def gguf_export_header(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def test_peft_folder_holds_the_mlx_factors_transposed_under_peft_names(random_adapter, tmp_path):
    adapter = adapter_export.read_mlx_adapter(random_adapter)
    adapter_export.write_peft(adapter, tmp_path / "peft", "HuggingFaceTB/SmolLM2-135M-Instruct")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RANK and config["lora_alpha"] == SCALE * RANK
    assert config["target_modules"] == sorted(m.split(".")[-1] for m in MODULES)
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    mlx = load_file(str(random_adapter / "adapters.safetensors"))
    assert len(peft) == len(mlx) == 2 * len(MODULES)
    for name, value in mlx.items():
        module, factor = name.rsplit(".lora_", 1)
        peft_name = f"base_model.model.{module}.lora_{factor.upper()}.weight"
        np.testing.assert_array_equal(peft[peft_name], value.T)  # PEFT: A [rank, in], B [out, rank]
    adapter_export.check_round_trip(adapter, tmp_path / "peft")


def test_a_peft_folder_that_differs_from_the_adapter_is_refused(random_adapter, tmp_path):
    adapter = adapter_export.read_mlx_adapter(random_adapter)
    adapter_export.write_peft(adapter, tmp_path / "peft", "base")
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] * 1.001
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(PipelineError, match="factors of .* differ"):
        adapter_export.check_round_trip(adapter, tmp_path / "peft")


def test_dora_and_full_fine_tuning_have_no_lora_files(random_adapter, tmp_path):
    assert adapter_export.unsupported_reason(random_adapter) is None
    for kind in ("dora", "full"):
        folder = tmp_path / kind
        shutil.copytree(random_adapter, folder)
        config = json.loads((folder / "adapter_config.json").read_text()) | {"fine_tune_type": kind}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        assert f"a {kind} adapter has no GGUF or PEFT LoRA form" in adapter_export.unsupported_reason(folder)


def test_an_adapter_that_does_not_fit_the_base_gguf_is_one_clear_line(
    tiny_model_dir, random_adapter, base_gguf, tmp_path
):
    fits = write_adapter_gguf(random_adapter, tiny_model_dir, tmp_path / "fits.gguf")
    adapter_export.check_pair(base_gguf, fits)
    adapter = adapter_export.read_mlx_adapter(random_adapter)
    module = next(m for m in adapter.factors if m.endswith("o_proj"))
    a, b = adapter.factors[module]
    other = {**adapter.factors, module: (np.zeros((a.shape[0] + 4, RANK), np.float32), b)}  # another base's width
    config = json.loads((tiny_model_dir / "config.json").read_text())
    mismatched = tmp_path / "other-base-lora.gguf"
    adapter_export.write_gguf_adapter(
        adapter_export.LoraAdapter(RANK, SCALE, 0.0, other), mismatched, config, "llama", "x"
    )
    with pytest.raises(
        PipelineError, match=r"does not fit the base GGUF base-f32.gguf: blk\.\d+\.attn_output\.weight is"
    ):
        adapter_export.check_pair(base_gguf, mismatched)
    with pytest.raises(PipelineError, match="it is not a LoRA adapter GGUF"):
        adapter_export.check_pair(base_gguf, base_gguf)
