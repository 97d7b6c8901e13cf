"""A trained MLX LoRA adapter as files other tools load: a GGUF LoRA adapter (llama.cpp's `--lora`,
Ollama's ADAPTER) and a Hugging Face PEFT folder (PEFT, vLLM, llama.cpp's convert_lora_to_gguf.py).

MLX stores each adapted linear layer's factors as lora_a [in, rank] and lora_b [rank, out] and computes
y = W x + scale * (x a) b. PEFT and llama.cpp store A = a^T [rank, in] and B = b^T [out, rank] and scale
by lora_alpha / rank, so alpha = scale * rank. llama.cpp names the factors after the base GGUF's tensor
(blk.N.attn_q.weight.lora_a) and, as for the base q/k weights, permutes the rows of B for q and k.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline import paths
from pipeline.errors import PipelineError

import gguf
import numpy as np
from safetensors.numpy import load_file, save_file

from lm.gguf_mapping import gguf_name, permute_qk

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# What a Hugging Face user would load as the base of a builtin model.
UPSTREAM_NAMES = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_MLX_FACTOR = re.compile(r"(.+)\.lora_([ab])")
_PEFT_FACTOR = re.compile(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight")


@dataclass(frozen=True)
class LoraAdapter:
    """Factors as MLX stores them, by module path (model.layers.22.self_attn.q_proj): (a [in, r], b [r, out])."""

    rank: int
    scale: float
    dropout: float
    factors: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def alpha(self) -> float:
        return self.scale * self.rank


def unsupported_reason(adapter_dir: Path) -> str | None:
    """Why the adapter in `adapter_dir` has no LoRA file form (DoRA, full fine-tuning), or None."""
    kind = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("fine_tune_type", "lora")
    if kind == "lora":
        return None
    return f"a {kind} adapter has no GGUF or PEFT LoRA form (only plain LoRA does): adapter exports skipped"


def read_mlx_adapter(adapter_dir: Path) -> LoraAdapter:
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    params = config["lora_parameters"]
    tensors = load_file(str(adapter_dir / "adapters.safetensors"))
    return LoraAdapter(
        params["rank"], float(params["scale"]), float(params.get("dropout", 0.0)), _pairs(tensors, _MLX_FACTOR, "ab")
    )


def _pairs(tensors: dict, pattern: re.Pattern, letters: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    found: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        match = pattern.fullmatch(name)
        if match is None:
            raise PipelineError(f"unexpected tensor '{name}' in a LoRA adapter", where=name, fix="retrain the adapter")
        found.setdefault(match[1], {})[match[2].lower()] = value.astype(np.float32)
    incomplete = sorted(m for m, f in found.items() if set(f) != {"a", "b"})
    if incomplete:
        raise PipelineError(
            f"LoRA module {incomplete[0]} lacks its lora_{letters[0]} or lora_{letters[1]} factor",
            where=incomplete[0],
            fix="retrain the adapter",
        )
    return {module: (f["a"], f["b"]) for module, f in sorted(found.items())}


def write_peft(adapter: LoraAdapter, out_dir: Path, base_model: str) -> None:
    """adapter_model.safetensors + adapter_config.json, as PEFT saves a LoRA for a causal LM."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in adapter.factors.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
    save_file(tensors, str(out_dir / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in adapter.factors}),
        "layers_to_transform": sorted({_layer(m) for m in adapter.factors}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    (out_dir / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_peft(peft_dir: Path) -> LoraAdapter:
    """A PEFT LoRA folder read back into MLX's layout (what write_peft wrote, checked by round trip)."""
    config = json.loads((peft_dir / PEFT_CONFIG).read_text(encoding="utf-8"))
    pairs = _pairs(load_file(str(peft_dir / PEFT_WEIGHTS)), _PEFT_FACTOR, "AB")
    rank = int(config["r"])
    factors = {module: (a.T, b.T) for module, (a, b) in pairs.items()}
    return LoraAdapter(rank, config["lora_alpha"] / rank, float(config.get("lora_dropout", 0.0)), factors)


def check_round_trip(adapter: LoraAdapter, peft_dir: Path) -> None:
    """The PEFT folder read back equals the MLX adapter: same modules, factors (bit for bit) and scale."""
    back = read_peft(peft_dir)
    problem = None
    if set(back.factors) != set(adapter.factors):
        problem = f"modules differ ({len(back.factors)} vs {len(adapter.factors)})"
    elif back.rank != adapter.rank or abs(back.scale - adapter.scale) > 1e-6 * abs(adapter.scale):
        problem = f"rank/scale {back.rank}/{back.scale} vs {adapter.rank}/{adapter.scale}"
    else:
        for module, (a, b) in adapter.factors.items():
            if not (np.array_equal(back.factors[module][0], a) and np.array_equal(back.factors[module][1], b)):
                problem = f"the factors of {module} differ"
                break
    if problem:
        raise PipelineError(
            f"the PEFT folder does not read back as the adapter: {problem}",
            where=paths.display(peft_dir),
            fix="report it with the quantize log",
        )


def write_gguf_adapter(adapter: LoraAdapter, out_path: Path, model_config: dict, arch: str, name: str) -> int:
    """The adapter as a llama.cpp LoRA GGUF (float32 factors); returns how many tensors it holds."""
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads", heads)
    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
    writer.add_name(name)
    for module, (a, b) in adapter.factors.items():
        try:
            base = gguf_name(f"{module}.weight")
        except KeyError:
            raise PipelineError(
                f"GGUF has no tensor for the adapted module {module}",
                where=paths.display(out_path),
                fix="set quantize.adapter_exports=[peft] to export only the PEFT folder",
            ) from None
        lora_b = b.T
        if module.endswith("q_proj"):
            lora_b = permute_qk(lora_b, heads)
        elif module.endswith("k_proj"):
            lora_b = permute_qk(lora_b, kv_heads)
        writer.add_tensor(f"{base}.lora_a", np.ascontiguousarray(a.T, dtype=np.float32))
        writer.add_tensor(f"{base}.lora_b", np.ascontiguousarray(lora_b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return 2 * len(adapter.factors)


def base_model_name(model_source: str) -> str:
    """base_model_name_or_path for PEFT: the Hugging Face name of a builtin model, else the source as given."""
    return UPSTREAM_NAMES.get(model_source, model_source)


def _layer(module: str) -> int:
    match = re.search(r"\.layers\.(\d+)\.", module)
    return int(match[1]) if match else -1


def check_pair(base_gguf: Path, adapter_gguf: Path) -> None:
    """The adapter GGUF fits the base GGUF (same architecture, every factor's base tensor there with the
    shapes llama.cpp checks): one clear line otherwise, before llama.cpp reads them."""
    problem = _pair_problem(gguf.GGUFReader(str(base_gguf)), gguf.GGUFReader(str(adapter_gguf)))
    if problem:
        raise PipelineError(
            f"the adapter GGUF does not fit the base GGUF {base_gguf.name}: {problem}",
            where=paths.display(adapter_gguf),
            fix="use the adapter with the base GGUF quantize wrote beside it (an adapter of another base model "
            "needs that model)",
        )


def _pair_problem(base, adapter) -> str | None:
    if _field(adapter, "general.type") != "adapter" or _field(adapter, "adapter.type") != "lora":
        return "it is not a LoRA adapter GGUF"
    arch, base_arch = _field(adapter, "general.architecture"), _field(base, "general.architecture")
    if arch != base_arch:
        return f"it is for {arch}, the base GGUF is {base_arch}"
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in base.tensors}  # GGUF order: ne0 (columns) first
    factors = {t.name: tuple(int(n) for n in t.shape) for t in adapter.tensors}
    for name in sorted(n for n in factors if n.endswith(".lora_a")):
        target = name.removesuffix(".lora_a")
        a_shape, b_shape = factors[name], factors.get(f"{target}.lora_b")
        if target not in shapes:
            return f"the base GGUF has no tensor {target}"
        if b_shape is None:
            return f"{target} has no lora_b factor"
        if a_shape[0] != shapes[target][0] or b_shape[1] != shapes[target][1]:
            return f"{target} is {shapes[target]} in the base GGUF, the adapter's factors {a_shape} and {b_shape}"
    return None


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()
