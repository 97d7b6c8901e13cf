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
import shutil
import sys
from pathlib import Path

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import cli, config, contracts, paths, runtime
from pipeline.errors import PipelineError
from pipeline.manifest import StageRun, file_entry, output_path

log = logging.getLogger("fuse")


def build_parser():
    return cli.stage_parser("fuse", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("fuse", args, run, sections=("experiments", "fuse"))


def run(cfg) -> Path:
    experiment = cfg.experiments.name
    run_dir = paths.RUNS_DIR / experiment
    stage = StageRun("fuse", {"fuse": config.section(cfg, "fuse")}, experiment=experiment)
    model_manifest = contracts.read_json(paths.MODEL_MANIFEST, "run_manifest")
    train_manifest = read_train_manifest(run_dir)
    contract = contracts.read_json(paths.DATA_DIR / "data_contract.json", "data_contract")
    base_dir, adapter_dir = output_path(model_manifest, "model"), output_path(train_manifest, "adapter")

    model, tokenizer, model_config = load_with_adapter(base_dir, adapter_dir)
    prompts = check_prompts(tokenizer, contract)
    reference = logits(model, prompts)
    was_quantized = fuse_in_full_precision(model, model_config, cfg.fuse.dtype)
    check_disk_space(model, run_dir)
    if contract["template"]["origin"] != "model":
        tokenizer.chat_template = contract["template"]["source"]
    fused_dir = run_dir / "fused"
    with contracts.atomic_dir(fused_dir) as tmp:
        save_fused(tmp, base_dir, model, tokenizer, model_config)
        difference = compare(tmp, prompts, reference, cfg.fuse.tolerance)

    entries = artifact_entries(experiment, model_manifest, adapter_dir, fused_dir, cfg)
    contracts.write_json(run_dir / "artifacts.json", {"experiment": experiment, "artifacts": entries}, "artifacts")
    details = {"max_logit_difference": difference, "base_was_quantized": was_quantized, "dtype": model_config.get("torch_dtype"), "check_prompts": len(prompts), "blas": runtime.blas_summary()["name"]}
    inputs = [file_entry("model", paths.MODEL_MANIFEST), file_entry("adapter", adapter_dir), file_entry("data_contract", paths.DATA_DIR / "data_contract.json")]
    stage.finish(run_dir / "fuse.manifest.json", inputs, [file_entry("fused", fused_dir), file_entry("artifacts", run_dir / "artifacts.json")], details)
    log.info("fused %s into %s (max |logit difference| %.2e over %d prompts)", paths.display(adapter_dir), paths.display(fused_dir), difference, len(prompts))
    return fused_dir


def read_train_manifest(run_dir: Path) -> dict:
    path = run_dir / "train.manifest.json"
    if not path.is_file():
        raise PipelineError(
            f"experiment '{run_dir.name}' has no trained adapter",
            where=paths.display(path),
            fix=f"run `make train EXP={run_dir.name}` first",
        )
    manifest = contracts.read_json(path, "run_manifest")
    adapter = output_path(manifest, "adapter")
    if not (adapter / "adapters.safetensors").is_file():
        raise PipelineError("the adapter files are missing", where=paths.display(adapter), fix=f"re-run `make train EXP={run_dir.name}`")
    return manifest


def load_with_adapter(base_dir: Path, adapter_dir: Path):
    from mlx_lm import load

    try:
        return load(str(base_dir), adapter_path=str(adapter_dir), return_config=True)
    except ValueError as exc:  # mlx-lm lists the missing or mis-shaped weights
        raise PipelineError(
            f"the adapter does not match the base model ({str(exc).splitlines()[0][:200]})",
            where=paths.display(adapter_dir),
            fix="train it again on this base model (`make train`), or set model.source back to the model it was trained on",
        ) from None


def check_prompts(tokenizer, contract: dict, count: int = 3) -> list[list[int]]:
    """A few test-split prompts as token ids, the inputs of the logits comparison."""
    import orjson

    lines = (paths.DATA_DIR / "test.jsonl").read_text(encoding="utf-8").splitlines()[:count]
    prompts = []
    for line in lines:
        record = orjson.loads(line)
        if "messages" in record:
            ids = tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=False)
        else:
            ids = tokenizer.encode(record.get("text") or record.get("prompt", ""))
        prompts.append(list(ids)[:256])
    return prompts or [tokenizer.encode("Hello")]


def logits(model, prompts: list[list[int]]) -> list:
    import mlx.core as mx
    import numpy as np

    return [np.array(model(mx.array([p])).astype(mx.float32)) for p in prompts]


def fuse_in_full_precision(model, model_config: dict, dtype: str) -> bool:
    """Merge every adapter into a dequantized weight; returns whether the base was quantized."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

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
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def check_disk_space(model, run_dir: Path) -> None:
    needed = int(sum(v.nbytes for _, v in _parameters(model)) * 1.1) + 50_000_000
    run_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise PipelineError(
            f"the fused model needs about {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free",
            where=paths.display(run_dir),
            fix="free some disk space (`make clean` removes generated runs) and run it again",
        )


def save_fused(folder: Path, base_dir: Path, model, tokenizer, model_config: dict) -> None:
    from mlx_lm.utils import save

    save(folder, base_dir, model, tokenizer, model_config, donate_model=False)
    if tokenizer.chat_template:
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def compare(fused_dir: Path, prompts, reference, tolerance: float) -> float:
    """Largest |logit difference| between the saved fused model and base + adapter."""
    import numpy as np
    from mlx_lm import load

    fused_model, _ = load(str(fused_dir))
    worst = max(float(np.abs(a - b).max()) for a, b in zip(logits(fused_model, prompts), reference))
    if worst > tolerance:
        raise PipelineError(
            f"the fused model's logits differ from base + adapter by {worst:.3g} (tolerance {tolerance})",
            where=paths.display(fused_dir.parent),
            fix="fuse in higher precision (fuse.dtype=float32) or raise fuse.tolerance if a low-precision dtype is intended",
        )
    return worst


def artifact_entries(experiment: str, model_manifest: dict, adapter_dir: Path, fused_dir: Path, cfg) -> list[dict]:
    base = model_manifest["outputs"][0]
    base_entry = {"id": "base", "kind": "base", "format": "mlx", "path": base["path"], "bytes": base["bytes"], "sha256": base["sha256"], "parent": None, "stage": "model", "config": model_manifest["config"]}
    adapter = file_entry("adapter", adapter_dir)
    fused = file_entry("fused", fused_dir)
    return [
        base_entry,
        {"id": f"{experiment}/adapter", "kind": "adapter", "format": "mlx-adapter", "path": adapter["path"], "bytes": adapter["bytes"], "sha256": adapter["sha256"], "parent": "base", "stage": "train", "config": {}},
        {"id": f"{experiment}/fused", "kind": "fused", "format": "mlx", "path": fused["path"], "bytes": fused["bytes"], "sha256": fused["sha256"], "parent": f"{experiment}/adapter", "stage": "fuse", "config": {"fuse": config.section(cfg, "fuse")}},
    ]


if __name__ == "__main__":
    sys.exit(main())
