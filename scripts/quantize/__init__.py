"""quantize stage: turn an experiment's fused model into the files people deploy, and prove they work.

Reads config section `quantize`, runs/<experiment>/fuse.manifest.json (run_manifest),
runs/<experiment>/artifacts.json (artifacts) and data/data_contract.json (data_contract: chat
template, test split). Writes runs/<experiment>/quantized/ — MLX quantized models (mlx-*/), a float
GGUF and llama.cpp quantizations of it (*.gguf) — adds them to artifacts.json, and writes
quantize.manifest.json last. The Ollama Modelfile and the Docker image come later, from the package
stage, once eval has decided which artifact ships.

Export check: the fused MLX model and the float GGUF run in llama.cpp must produce the same greedy
tokens for test prompts (the first differing position is reported otherwise); each quantized GGUF's
perplexity on the test split is recorded against the float GGUF's.

The adapter route (quantize.adapter_exports, quantize/adapter.py): the LoRA adapter as a GGUF, with the
base model as a float GGUF and its quantizations, checked in llama.cpp against the fused float GGUF;
and as a PEFT folder, checked by reading it back.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import cli, config, contracts, disk, paths, runtime, splits, stages
from pipeline.compare import first_difference
from pipeline.errors import PipelineError
from pipeline.manifest import StageRun, file_entry, output_path

import mlx.core as mx
import orjson
from mlx_lm import load
from mlx_lm.convert import mixed_quant_predicate_builder
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.utils import quantize_model, save

from lm import hf_to_gguf, llama_runner, tokens
from quantize import adapter

log = logging.getLogger("quantize")

MLX_RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
MLX_MODES = {"affine": (4, 8), "mxfp4": (4,), "mxfp8": (8,), "nvfp4": (4,)}
FLOAT_TAGS = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}


@dataclass(frozen=True)
class MlxQuantization:
    """One MLX quantized model: a mode with bits (affine-4, mxfp4) or a mixed-precision recipe (mixed_4_6)."""

    spec: str
    mode: str
    bits: int | None
    group_size: int | None
    recipe: str | None = None

    @property
    def folder(self) -> str:
        if self.recipe:
            return f"mlx-{self.recipe}-g{self.group_size}"
        group = f"-g{self.group_size}" if self.mode == "affine" else ""
        return f"mlx-{self.mode}-{self.bits}bit{group}"


def build_parser():
    return cli.stage_parser("quantize", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("quantize", args, run)


def run(cfg) -> Path:
    qcfg = cfg.quantize
    experiment = cfg.experiment.name
    run_dir = paths.run_dir(experiment)
    stage = StageRun("quantize", {"quantize": config.section(cfg, "quantize")}, experiment=experiment)
    mlx_quants = [parse_mlx_spec(s, qcfg.group_size) for s in qcfg.mlx]
    hf_to_gguf.check_quantization_types(list(qcfg.gguf_types), where="config quantize.gguf_types")
    if qcfg.gguf_float == "none" and qcfg.gguf_types:
        raise PipelineError(
            f"quantize.gguf_types lists {', '.join(qcfg.gguf_types)}, which are made from the float GGUF, "
            "but quantize.gguf_float is none",
            where="config quantize.gguf_float",
            fix="set quantize.gguf_float=float16 (or bfloat16, float32), or quantize.gguf_types=[]",
        )
    fuse_manifest = stages.read_manifest("fuse", experiment)
    stages.read_manifest("prepare")
    fused_dir = output_path(fuse_manifest, "fused")
    contract = contracts.read_json(paths.DATA_CONTRACT, "data_contract")
    check_disk_space(fused_dir, run_dir, mlx_quants, qcfg)

    out_dir = run_dir / "quantized"
    float_tag = FLOAT_TAGS.get(qcfg.gguf_float)  # None: no GGUF
    timings, details = {}, {}
    staged_dir = stage.staged(out_dir)
    with contracts.atomic_dir(staged_dir) as tmp:
        for quant in mlx_quants:
            with timed(timings, quant.folder):
                write_mlx_quantized(fused_dir, tmp / quant.folder, quant)
        ggufs = {}
        if float_tag:
            ggufs = write_ggufs(fused_dir, tmp, experiment, qcfg, contract, float_tag, timings)
            details["export_check"] = export_check(fused_dir, ggufs[float_tag], contract, qcfg)
            details["perplexity"] = perplexity_table(ggufs, float_tag, fused_dir, contract, qcfg)
        if qcfg.adapter_exports:
            with timed(timings, "adapter"):
                details["adapter"] = adapter.export(
                    read_artifacts(experiment), tmp, experiment, qcfg, contract, cfg.model.source, ggufs.get(float_tag)
                )
    details["seconds"] = timings

    artifacts_out = stage.staged(paths.artifacts_file(experiment))
    artifacts = update_artifacts(
        artifacts_out, experiment, staged_dir, out_dir, mlx_quants, float_tag, cfg, details.get("adapter", {})
    )
    outputs = [stage.entry("quantized", out_dir), stage.entry("artifacts", paths.artifacts_file(experiment))]
    inputs = [file_entry("fused", fused_dir), file_entry("data_contract", paths.DATA_CONTRACT)]
    stage.finish(run_dir / "quantize.manifest.json", inputs, outputs, details)
    log.info("wrote %d artifacts to %s", len(artifacts) - 3, paths.display(out_dir))
    return out_dir


def parse_mlx_spec(spec: str, group_size: int) -> MlxQuantization:
    if spec in MLX_RECIPES:
        return MlxQuantization(spec, "affine", None, group_size, recipe=spec)
    mode, _, bits = spec.partition("-")
    if mode in MLX_MODES and (not bits or bits.isdigit()):
        bits_value = int(bits) if bits else MLX_MODES[mode][0]
        if bits_value in MLX_MODES[mode]:
            return MlxQuantization(spec, mode, bits_value, group_size if mode == "affine" else None)
    choices = [f"{m}-{b}" for m, bs in MLX_MODES.items() for b in bs] + list(MLX_RECIPES)
    raise PipelineError(
        f"unknown MLX quantization '{spec}'", where="config quantize.mlx", fix=f"use any of: {', '.join(choices)}"
    )


def check_disk_space(fused_dir: Path, run_dir: Path, mlx_quants, qcfg) -> None:
    """Estimate what this run writes (from the parameter count) and refuse before writing anything."""
    fused_bytes = sum(p.stat().st_size for p in fused_dir.glob("*.safetensors"))
    fused_config = orjson.loads((fused_dir / "config.json").read_bytes())
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(fused_config.get("torch_dtype"), 4)
    params = fused_bytes / dtype_bytes
    bits = [(q.bits or 6) + 1 for q in mlx_quants]
    bits += {"none": [], "float32": [32]}.get(qcfg.gguf_float, [16]) + [_nominal_bits(t) for t in qcfg.gguf_types]
    disk.require_free_space(
        run_dir,
        int(params * sum(bits) / 8),
        what="the quantized files",
        fix="free some disk space or make fewer files (quantize.mlx, quantize.gguf_types)",
    )


def _nominal_bits(type_name: str) -> int:
    digits = re.search(r"\d+", type_name)
    return int(digits.group()) + 2 if digits else 16


class timed:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.monotonic()
        log.info("%s …", self.name)

    def __exit__(self, *exc):
        self.timings[self.name] = round(time.monotonic() - self.start, 2)


def write_mlx_quantized(fused_dir: Path, out_dir: Path, quant: MlxQuantization) -> None:
    model, tokenizer, model_config = load(str(fused_dir), return_config=True)
    predicate = mixed_quant_predicate_builder(quant.recipe, model, quant.group_size) if quant.recipe else None
    model, model_config = quantize_model(
        model, model_config, quant.group_size, quant.bits, mode=quant.mode, quant_predicate=predicate
    )
    save(out_dir, fused_dir, model, tokenizer, model_config, donate_model=False)
    template = fused_dir / "chat_template.jinja"
    if template.is_file():
        shutil.copy2(template, out_dir / template.name)


def gguf_file_name(experiment: str, tag: str) -> str:
    return f"{experiment}-{tag}.gguf"


def write_ggufs(
    fused_dir: Path, out_dir: Path, experiment: str, qcfg, contract: dict, float_tag: str, timings: dict
) -> dict[str, Path]:
    float_path = out_dir / gguf_file_name(experiment, float_tag)
    with timed(timings, f"gguf-{float_tag}"):
        hf_to_gguf.write_gguf(
            fused_dir,
            float_path,
            float_type=qcfg.gguf_float,
            chat_template=contract["template"]["source"],
            name=experiment,
        )
    files = {float_tag: float_path}
    for type_name in qcfg.gguf_types:
        files[type_name] = out_dir / gguf_file_name(experiment, type_name)
        with timed(timings, f"gguf-{type_name}"):
            hf_to_gguf.quantize_gguf(float_path, files[type_name], type_name, threads=runtime.cpu_threads())
    return files


def load_fused_tokenizer(fused_dir: Path):
    return load_tokenizer(fused_dir)


def mlx_greedy(model, prompt: list[int], max_tokens: int, stop_ids: set[int]) -> list[int]:
    tokens = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        tokens.append(int(token))
        if tokens[-1] in stop_ids:
            break
    return tokens


def export_check(fused_dir: Path, float_gguf: Path, contract: dict, qcfg) -> dict:
    """Greedy tokens of the fused MLX model vs the float GGUF in llama.cpp, prompt by prompt."""
    model, tokenizer = load(str(fused_dir))
    prompts = tokens.check_prompts(contract, tokenizer, qcfg.check_prompts)
    stop_ids = set(tokenizer.eos_token_ids)
    llm = llama_runner.open_llama(float_gguf, n_ctx=max(map(len, prompts), default=1) + qcfg.check_max_tokens + 8)
    results = []
    for index, prompt in enumerate(prompts):
        llama_prompt = llm.tokenize(tokenizer.decode(prompt).encode("utf-8"), add_bos=False, special=True)
        expected = mlx_greedy(model, prompt, qcfg.check_max_tokens, stop_ids)
        got = llama_runner.greedy(llm, prompt, qcfg.check_max_tokens, stop_ids)
        results.append(_compare_tokens(index, prompt, llama_prompt, expected, got, tokenizer))
    mismatches = [r for r in results if not r["match"]]
    summary = {
        "prompts": len(results),
        "matching": len(results) - len(mismatches),
        "max_tokens": qcfg.check_max_tokens,
        "results": results,
    }
    for r in mismatches:
        log.warning("export check: prompt %d differs at %s: %s", r["prompt"], r["first_difference"], r["detail"])
    if mismatches and qcfg.on_mismatch == "fail":
        first = mismatches[0]
        raise PipelineError(
            f"the float GGUF does not answer like the fused MLX model: prompt {first['prompt']} differs at "
            f"{first['first_difference']} ({first['detail']})",
            where=paths.display(float_gguf),
            fix="report it with the quantize log; set quantize.on_mismatch=warn to keep the files anyway",
        )
    log.info(
        "export check: %d/%d prompts token-for-token identical (MLX fused vs llama.cpp %s)",
        summary["matching"],
        len(results),
        float_gguf.name,
    )
    return summary


def _compare_tokens(index: int, prompt, llama_prompt, expected, got, tokenizer) -> dict:
    if list(llama_prompt) != list(prompt):
        position = first_difference(prompt, llama_prompt)
        return {
            "prompt": index,
            "match": False,
            "first_difference": f"prompt token {position}",
            "detail": "llama.cpp tokenizes the prompt differently",
            "mlx": tokenizer.decode(expected),
            "llama_cpp": tokenizer.decode(got),
        }
    if expected == got:
        return {
            "prompt": index,
            "match": True,
            "first_difference": None,
            "detail": f"{len(got)} tokens",
            "mlx": tokenizer.decode(expected),
            "llama_cpp": tokenizer.decode(got),
        }
    position = first_difference(expected, got)
    detail = f"MLX {expected[position : position + 1]} vs llama.cpp {got[position : position + 1]}"
    return {
        "prompt": index,
        "match": False,
        "first_difference": f"generated token {position}",
        "detail": detail,
        "mlx": tokenizer.decode(expected),
        "llama_cpp": tokenizer.decode(got),
    }


def _perplexity_row(path: Path, items) -> dict:
    row = llama_runner.perplexity(path, items)
    del row["per_item"]
    return {**row, "bytes": path.stat().st_size}


def perplexity_table(ggufs: dict[str, Path], float_tag: str, fused_dir: Path, contract: dict, qcfg) -> dict:
    """Perplexity of each GGUF on the same test tokens (loss on the trained tokens only), and its change vs float."""
    tokenizer = load_fused_tokenizer(fused_dir)
    records = splits.read_split(contract, "test", qcfg.perplexity_records)
    items = [tokens.encode(r, contract, tokenizer, mask_prompt=True) for r in records]
    items = [(ids, mask) for ids, mask in items if mask[1:].sum() > 0]
    if not items:
        return {"records": 0, "note": "no scored tokens in the test split"}
    table = {tag: _perplexity_row(path, items) for tag, path in ggufs.items()}
    reference = table[float_tag]["perplexity"]
    for row in table.values():
        row["change_vs_float"] = row["perplexity"] - reference
        row["ratio_vs_float"] = row["perplexity"] / reference
    log.info(
        "perplexity on %d test records: %s",
        len(items),
        ", ".join(f"{t} {r['perplexity']:.4f}" for t, r in table.items()),
    )
    return {"records": len(items), "by_type": table}


def read_artifacts(experiment: str) -> list[dict]:
    return contracts.read_json(paths.artifacts_file(experiment), "artifacts")["artifacts"]


def update_artifacts(
    out: Path, experiment: str, out_dir: Path, final_dir: Path, mlx_quants, float_tag: str, cfg, adapter_details: dict
) -> list[dict]:
    """artifacts.json with this stage's entries replaced, keeping fuse's (base → adapter → fused), written
    to `out`. The files are read in `out_dir` and recorded at their final place, `final_dir`."""
    entries = [a for a in read_artifacts(experiment) if a["stage"] != "quantize"]
    slice_ = {"quantize": config.section(cfg, "quantize")}
    fused_id = f"{experiment}/fused"

    def add(kind: str, fmt: str, file: Path, parent: str) -> str:
        entry = file_entry(kind, file, recorded_as=final_dir / file.relative_to(out_dir))
        artifact_id = f"{experiment}/{file.name}"
        entries.append(
            {
                "id": artifact_id,
                "kind": kind,
                "format": fmt,
                "path": entry["path"],
                "bytes": entry["bytes"],
                "sha256": entry["sha256"],
                "parent": parent,
                "stage": "quantize",
                "config": slice_,
            }
        )
        return artifact_id

    for quant in mlx_quants:
        add("mlx-quantized", f"mlx-{quant.spec}", out_dir / quant.folder, fused_id)
    if float_tag:
        float_file = out_dir / gguf_file_name(experiment, float_tag)
        float_id = add("gguf", f"gguf-{float_tag}", float_file, fused_id)
        for type_name in cfg.quantize.gguf_types:
            add("gguf", f"gguf-{type_name}", out_dir / gguf_file_name(experiment, type_name), float_id)
    adapter_id = f"{experiment}/adapter"
    if "peft" in adapter_details:
        add("peft", "peft-lora", out_dir / adapter.peft_folder_name(experiment), adapter_id)
    if "check" in adapter_details.get("gguf", {}):
        base_float_id = add("gguf-base", f"gguf-{float_tag}", out_dir / adapter.base_gguf_name(float_tag), "base")
        for type_name in cfg.quantize.gguf_types:
            add("gguf-base", f"gguf-{type_name}", out_dir / adapter.base_gguf_name(type_name), base_float_id)
        add("gguf-adapter", "gguf-lora-f32", out_dir / adapter.adapter_gguf_name(experiment), adapter_id)
    contracts.write_json(out, {"experiment": experiment, "artifacts": entries}, "artifacts")
    return entries
