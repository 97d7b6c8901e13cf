"""fuse stage: merge an experiment's adapter into full-precision base weights.

Reads config section `fuse`, runs/model.manifest.json, runs/<experiment>/train.manifest.json (both
run_manifest) and data/data_contract.json (data_contract, for the chat template). Writes
runs/<experiment>/fused/ (safetensors, config, tokenizer with the contract's chat template),
runs/<experiment>/artifacts.json (artifacts: base → adapter → fused, with sha256) and, last,
runs/<experiment>/fuse.manifest.json (run_manifest).

A quantized base is dequantized and the adapter's delta added in full precision: mlx-lm's default
fuse re-quantizes the merged weight, and the small LoRA delta then mostly rounds away, so the "fused"
model behaves like the base. Before anything is kept, the fused model's logits are compared with
base + adapter on test prompts.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import cli, config, contracts, disk, paths, runtime, stages
from pipeline.errors import PipelineError
from pipeline.manifest import StageRun, file_entry, output_entry, output_path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load
from mlx_lm.utils import dequantize_model, save

from lm import tokens

log = logging.getLogger("fuse")
CHECK_PROMPTS = 3  # test prompts whose logits are compared, fused vs base + adapter


def build_parser():
    return cli.stage_parser("fuse", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("fuse", args, run)


def run(cfg) -> Path:
    experiment = cfg.experiment.name
    run_dir = paths.run_dir(experiment)
    stage = StageRun("fuse", {"fuse": config.section(cfg, "fuse")}, experiment=experiment)
    model_manifest = stages.read_manifest("model")
    stages.read_manifest("prepare")
    train_manifest = stages.read_manifest("train", experiment)
    contract = contracts.read_json(paths.DATA_CONTRACT, "data_contract")
    base_dir, adapter_dir = output_path(model_manifest, "model"), output_path(train_manifest, "adapter")

    model, tokenizer, model_config = load_with_adapter(base_dir, adapter_dir)
    prompts = tokens.check_prompts(contract, tokenizer, CHECK_PROMPTS) or [tokenizer.encode("Hello")]
    reference = logits(model, prompts)
    was_quantized = fuse_in_full_precision(model, model_config, cfg.fuse.dtype)
    check_disk_space(model, run_dir)
    if contract["template"]["origin"] != "model":
        tokenizer.chat_template = contract["template"]["source"]
    fused_dir = run_dir / "fused"
    with contracts.atomic_dir(stage.staged(fused_dir)) as tmp:
        save_fused(tmp, base_dir, model, tokenizer, model_config)
        difference = compare(tmp, prompts, reference, cfg.fuse.tolerance, where=paths.display(fused_dir))

    fused = stage.entry("fused", fused_dir)
    entries = artifact_entries(experiment, model_manifest, adapter_dir, fused, cfg)
    contracts.write_json(
        stage.staged(paths.artifacts_file(experiment)), {"experiment": experiment, "artifacts": entries}, "artifacts"
    )
    details = {
        "max_logit_difference": difference,
        "base_was_quantized": was_quantized,
        "dtype": model_config.get("torch_dtype"),
        "check_prompts": len(prompts),
        "blas": runtime.blas_summary()["name"],
    }
    inputs = [
        file_entry("model", paths.MODEL_MANIFEST),
        file_entry("adapter", adapter_dir),
        file_entry("data_contract", paths.DATA_CONTRACT),
    ]
    outputs = [fused, stage.entry("artifacts", paths.artifacts_file(experiment))]
    stage.finish(stages.get("fuse").manifest_path(experiment), inputs, outputs, details)
    log.info(
        "fused %s into %s (max |logit difference| %.2e over %d prompts)",
        paths.display(adapter_dir),
        paths.display(fused_dir),
        difference,
        len(prompts),
    )
    return fused_dir


def load_with_adapter(base_dir: Path, adapter_dir: Path):
    try:
        return load(str(base_dir), adapter_path=str(adapter_dir), return_config=True)
    except ValueError as exc:  # mlx-lm lists the missing or mis-shaped weights
        raise PipelineError(
            f"the adapter does not match the base model ({str(exc).splitlines()[0][:200]})",
            where=paths.display(adapter_dir),
            fix="train it again on this base model (`make train`), or set model.source back to the model it "
            "was trained on",
        ) from exc


def logits(model, prompts: list[list[int]]) -> list:
    return [np.array(model(mx.array([p])).astype(mx.float32)) for p in prompts]


def fuse_in_full_precision(model, model_config: dict, dtype: str) -> bool:
    """Merge every adapter into a dequantized weight; returns whether the base was quantized."""
    was_quantized = "quantization" in model_config or "quantization_config" in model_config
    fused = [(name, module.fuse(dequantize=True)) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if was_quantized:
        dequantize_model(model)
        model_config.pop("quantization", None)
        model_config.pop("quantization_config", None)
    if dtype != "auto":
        model.set_dtype(getattr(mx, dtype))
    model_config["torch_dtype"] = str(next(iter(p.dtype for _, p in _parameters(model)))).removeprefix("mlx.core.")
    return was_quantized


def _parameters(model):
    return tree_flatten(model.parameters())


def check_disk_space(model, run_dir: Path) -> None:
    disk.require_free_space(
        run_dir,
        sum(v.nbytes for _, v in _parameters(model)),
        what="the fused model",
        fix="free some disk space (`make clean` removes generated runs) and run it again",
    )


def save_fused(folder: Path, base_dir: Path, model, tokenizer, model_config: dict) -> None:
    save(folder, base_dir, model, tokenizer, model_config, donate_model=False)
    if tokenizer.chat_template:
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def compare(fused_dir: Path, prompts, reference, tolerance: float, where: str) -> float:
    """Largest |logit difference| between the saved fused model and base + adapter."""
    fused_model, _ = load(str(fused_dir))
    worst = max(float(np.abs(a - b).max()) for a, b in zip(logits(fused_model, prompts), reference))
    if worst > tolerance:
        raise PipelineError(
            f"the fused model's logits differ from base + adapter by {worst:.3g} (tolerance {tolerance})",
            where=where,
            fix="fuse in higher precision (fuse.dtype=float32) or raise fuse.tolerance if a low-precision "
            "dtype is intended",
        )
    return worst


def artifact_entries(experiment: str, model_manifest: dict, adapter_dir: Path, fused: dict, cfg) -> list[dict]:
    base = output_entry(model_manifest, "model")
    base_entry = {
        "id": "base",
        "kind": "base",
        "format": "mlx",
        "path": base["path"],
        "bytes": base["bytes"],
        "sha256": base["sha256"],
        "parent": None,
        "stage": "model",
        "config": model_manifest["config"],
    }
    adapter = file_entry("adapter", adapter_dir)
    return [
        base_entry,
        {
            "id": f"{experiment}/adapter",
            "kind": "adapter",
            "format": "mlx-adapter",
            "path": adapter["path"],
            "bytes": adapter["bytes"],
            "sha256": adapter["sha256"],
            "parent": "base",
            "stage": "train",
            "config": {},
        },
        {
            "id": f"{experiment}/fused",
            "kind": "fused",
            "format": "mlx",
            "path": fused["path"],
            "bytes": fused["bytes"],
            "sha256": fused["sha256"],
            "parent": f"{experiment}/adapter",
            "stage": "fuse",
            "config": {"fuse": config.section(cfg, "fuse")},
        },
    ]


if __name__ == "__main__":
    sys.exit(main())
