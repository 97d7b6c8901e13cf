"""quantize's adapter route: the LoRA adapter as a GGUF (beside the base model as a float GGUF and its
quantizations) and as a PEFT folder, each proven before it is kept.

The GGUF adapter is checked the way the fused float GGUF is: in llama.cpp, the base GGUF with the
adapter applied must give the fused float GGUF's greedy tokens on the check prompts, and its logits
after each prompt must lie within quantize.adapter_logit_tolerance of the fused GGUF's. The PEFT
folder is read back and compared with the MLX adapter, factor for factor.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from pipeline import paths, runtime
from pipeline.compare import first_difference
from pipeline.errors import PipelineError

import numpy as np
from mlx_lm.tokenizer_utils import load as load_tokenizer

from lm import adapter_export, hf_to_gguf, llama_runner, tokens

log = logging.getLogger("quantize")

BASE_NAME = "base"


def base_gguf_name(tag: str) -> str:
    return f"{BASE_NAME}-{tag}.gguf"


def adapter_gguf_name(experiment: str) -> str:
    return f"{experiment}-lora.gguf"


def peft_folder_name(experiment: str) -> str:
    return f"{experiment}-peft"


def export(artifacts: list[dict], out_dir: Path, experiment: str, qcfg, contract: dict, model_source: str, fused_gguf):
    """Write the adapter exports quantize.adapter_exports asks for into `out_dir` and check them; returns
    the details for the manifest. `fused_gguf` is the fused float GGUF (None without GGUFs)."""
    by_kind = {a["kind"]: a for a in artifacts}
    adapter_dir, base_dir = paths.resolve(by_kind["adapter"]["path"]), paths.resolve(by_kind["base"]["path"])
    reason = adapter_export.unsupported_reason(adapter_dir)
    if reason:
        log.info(reason)
        return {"skipped": reason}
    adapter = adapter_export.read_mlx_adapter(adapter_dir)
    details = {"rank": adapter.rank, "alpha": adapter.alpha, "modules": len(adapter.factors)}
    if "peft" in qcfg.adapter_exports:
        peft_dir = out_dir / peft_folder_name(experiment)
        adapter_export.write_peft(adapter, peft_dir, adapter_export.base_model_name(model_source))
        adapter_export.check_round_trip(adapter, peft_dir)
        details["peft"] = {
            "base_model_name_or_path": adapter_export.base_model_name(model_source),
            "round_trip": "equal",
        }
    if "gguf" in qcfg.adapter_exports:
        if fused_gguf is None:
            log.info("adapter GGUF skipped: quantize.gguf_float is none, so there is no base GGUF to pair it with")
            details["gguf"] = {"skipped": "quantize.gguf_float is none"}
        else:
            details["gguf"] = export_gguf(adapter, base_dir, out_dir, experiment, qcfg, contract, fused_gguf)
    return details


def export_gguf(adapter, base_dir: Path, out_dir: Path, experiment: str, qcfg, contract: dict, fused_gguf: Path):
    tag = fused_gguf.stem.rsplit("-", 1)[-1]
    base_float = out_dir / base_gguf_name(tag)
    hf_to_gguf.write_gguf(
        base_dir, base_float, float_type=qcfg.gguf_float, chat_template=contract["template"]["source"], name=BASE_NAME
    )
    for type_name in qcfg.gguf_types:
        hf_to_gguf.quantize_gguf(
            base_float, out_dir / base_gguf_name(type_name), type_name, threads=runtime.cpu_threads()
        )
    model_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    arch = hf_to_gguf.check_architecture(model_config, paths.display(base_dir / "config.json"))
    adapter_path = out_dir / adapter_gguf_name(experiment)
    tensors = adapter_export.write_gguf_adapter(adapter, adapter_path, model_config, arch, f"{experiment}-lora")
    check = check_gguf_adapter(base_float, adapter_path, fused_gguf, base_dir, contract, qcfg)
    return {"tensors": tensors, "base": base_float.name, "check": check}


def check_gguf_adapter(base_gguf: Path, adapter_gguf: Path, fused_gguf: Path, base_dir: Path, contract, qcfg) -> dict:
    """llama.cpp: base GGUF + adapter GGUF against the fused float GGUF, prompt by prompt (greedy tokens
    and the logits after the prompt). A mismatch stops the stage, naming the prompt and first differing token."""
    tokenizer = load_tokenizer(base_dir)
    prompts = tokens.check_prompts(contract, tokenizer, qcfg.check_prompts)
    stop_ids = set(tokenizer.eos_token_ids)
    n_ctx = max(map(len, prompts), default=1) + qcfg.check_max_tokens + 8
    results, largest = [], 0.0
    with (
        contextlib.closing(llama_runner.open_llama(base_gguf, n_ctx, lora_path=adapter_gguf)) as with_adapter,
        contextlib.closing(llama_runner.open_llama(fused_gguf, n_ctx)) as fused,
    ):
        for index, prompt in enumerate(prompts):
            difference = float(
                np.max(np.abs(llama_runner.last_logits(with_adapter, prompt) - llama_runner.last_logits(fused, prompt)))
            )
            largest = max(largest, difference)
            expected = llama_runner.greedy(fused, prompt, qcfg.check_max_tokens, stop_ids)
            got = llama_runner.greedy(with_adapter, prompt, qcfg.check_max_tokens, stop_ids)
            results.append(
                {"prompt": index, "match": got == expected, "tokens": len(got), "max_logit_difference": difference}
            )
            if got != expected or difference > qcfg.adapter_logit_tolerance:
                raise mismatch(index, expected, got, difference, tokenizer, adapter_gguf, qcfg)
    log.info(
        "adapter check: %d/%d prompts token-for-token identical (llama.cpp %s + %s vs %s), max logit difference %.2g",
        len(results),
        len(results),
        base_gguf.name,
        adapter_gguf.name,
        fused_gguf.name,
        largest,
    )
    return {
        "prompts": len(results),
        "matching": len(results),
        "max_tokens": qcfg.check_max_tokens,
        "max_logit_difference": largest,
        "tolerance": qcfg.adapter_logit_tolerance,
        "results": results,
    }


def mismatch(index: int, expected, got, difference: float, tokenizer, where: Path, qcfg) -> PipelineError:
    if got != expected:
        position = first_difference(expected, got)
        what = (
            f"generated token {position} differs: fused {tokenizer.decode(expected[position : position + 1])!r} "
            f"vs base + adapter {tokenizer.decode(got[position : position + 1])!r}"
        )
    else:
        tolerance = qcfg.adapter_logit_tolerance
        what = f"logits differ by up to {difference:.3g}, above quantize.adapter_logit_tolerance {tolerance}"
    return PipelineError(
        f"the adapter GGUF on the base GGUF does not answer like the fused GGUF: check prompt {index}: {what}",
        where=paths.display(where),
        fix="report it with the quantize log; set quantize.adapter_exports=[peft] to skip the adapter GGUF",
    )
