"""GGUF files from an MLX/HF model folder, written with the `gguf` library the way llama.cpp's own
converter writes them (tensor names and q/k row order from lm.gguf_mapping), and quantized with
llama.cpp itself (`llama_model_quantize`).

mlx-lm's `--export-gguf` is not used: llama.cpp refuses its files (token types stored as UINT32), it
keeps float32 weights as float32 and it knows only llama/mistral/mixtral.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from pipeline import paths
from pipeline.errors import PipelineError

import gguf
import llama_cpp
import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from lm.gguf_mapping import (
    PRE_TYPES,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_USER_DEFINED,
    byte_level_pre_tokenizer,
    gguf_name,
    permute_qk,
)

# model_type in config.json → GGUF architecture; mistral's tensors and keys are llama's (as in llama.cpp).
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
FLOAT_TYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}

logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp prints a line per tensor it quantizes
logging.getLogger("gguf").setLevel(logging.WARNING)
_PRE_PROBE = (
    "Hello World! 3333 33 3.14 don't I'm \n\n\t  spaces   tabs\ttabs ü ñ 日本語 🦙 <|im_start|>x "
    "'s 're 've ll ALL CAPS 1234567 x=y+z; {\"a\": [1, 2]}\r\n  indented"
)


def check_architecture(model_config: dict, where: str) -> str:
    model_type = model_config.get("model_type", "?")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise PipelineError(
            f"GGUF export does not support model_type '{model_type}'",
            where=where,
            fix=f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}; set quantize.gguf_float=none to make "
            f"only MLX models",
        )
    if model_config.get("attention_bias") or model_config.get("mlp_bias"):
        raise PipelineError(
            "GGUF export does not support attention or MLP biases", where=where, fix="set quantize.gguf_float=none"
        )
    return SUPPORTED_ARCHITECTURES[model_type]


def tokenizer_vocab(model_dir: Path) -> dict:
    """Tokens (by id), their llama.cpp types, merges and the pre-tokenizer type of a byte-level BPE tokenizer."""
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise PipelineError(
            f"GGUF export supports byte-level BPE tokenizers only (this one is {model.get('type')})",
            where=paths.display(model_dir / "tokenizer.json"),
            fix="set quantize.gguf_float=none to make only MLX models",
        )
    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in tokenizer.get("added_tokens", [])}
    vocab.update({content: a["id"] for content, a in added.items()})
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TOKEN_USER_DEFINED] * size
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = (
            (TOKEN_CONTROL if added[token]["special"] else TOKEN_USER_DEFINED) if token in added else TOKEN_NORMAL
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": detect_pre_type(model_dir / "tokenizer.json")}


def detect_pre_type(tokenizer_path: Path) -> str:
    """llama.cpp's pre-tokenizer name for this tokenizer: the candidate whose definition equals the
    tokenizer's own, else the first that splits a probe text identically."""
    original = Tokenizer.from_file(str(tokenizer_path))
    own = json.loads(original.to_str()).get("pre_tokenizer")
    candidates = {pre: Tokenizer.from_str(original.to_str()) for pre in PRE_TYPES}
    for pre, candidate in candidates.items():
        candidate.pre_tokenizer = byte_level_pre_tokenizer(pre)
        if json.loads(candidate.to_str()).get("pre_tokenizer") == own:
            return pre
    expected = original.encode(_PRE_PROBE, add_special_tokens=False).ids
    for pre, candidate in candidates.items():
        if candidate.encode(_PRE_PROBE, add_special_tokens=False).ids == expected:
            return pre
    raise PipelineError(
        "the tokenizer's pre-tokenizer matches none llama.cpp knows here",
        where=paths.display(tokenizer_path),
        fix=f"supported: {', '.join(PRE_TYPES)}; set quantize.gguf_float=none to make only MLX models",
    )


def write_gguf(model_dir: Path, out_path: Path, *, float_type: str, chat_template: str | None, name: str) -> dict:
    """Write the model folder as a float GGUF (F16, BF16 or F32 matrices; norms stay F32)."""
    model_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = check_architecture(model_config, paths.display(model_dir / "config.json"))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = tokenizer_vocab(model_dir)

    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_name(name)
    writer.add_file_type(
        getattr(gguf.LlamaFileType, f"MOSTLY_{FLOAT_TYPES[float_type]}" if float_type != "float32" else "ALL_F32")
    )
    _add_hyperparameters(writer, model_config, len(vocab["tokens"]))
    _add_tokenizer(writer, vocab, tokenizer_config, model_config, chat_template)
    tensors = _add_tensors(writer, model_dir, model_config, float_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "tensors": tensors, "pre_tokenizer": vocab["pre"], "vocab_size": len(vocab["tokens"])}


def _add_hyperparameters(writer, model_config: dict, vocab_size: int) -> None:
    heads = model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(model_config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(model_config["hidden_size"])
    writer.add_block_count(model_config["num_hidden_layers"])
    writer.add_feed_forward_length(model_config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(model_config.get("num_key_value_heads", heads))
    writer.add_layer_norm_rms_eps(model_config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(model_config.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != model_config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    scaling = model_config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif scaling:
        raise PipelineError(
            f"GGUF export does not support rope_scaling {scaling}",
            where="config.json",
            fix="set quantize.gguf_float=none",
        )


def _add_tokenizer(writer, vocab: dict, tokenizer_config: dict, model_config: dict, chat_template: str | None) -> None:
    token_id = {t: i for i, t in enumerate(vocab["tokens"])}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("unk_token", writer.add_unk_token_id),
        ("pad_token", writer.add_pad_token_id),
    ):
        token = tokenizer_config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in token_id:
            add(token_id[token])
        elif key in ("bos_token", "eos_token") and isinstance(model_config.get(f"{key}_id"), int):
            add(model_config[f"{key}_id"])
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(tokenizer_config.get("add_eos_token", False)))
    if chat_template:
        writer.add_chat_template(chat_template)


def _add_tensors(writer, model_dir: Path, model_config: dict, float_type: str) -> int:
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads", heads)
    target = {"float16": np.float16, "float32": np.float32}.get(float_type)
    weights, count = {}, 0
    for shard in sorted(model_dir.glob("*.safetensors")):
        weights.update(mx.load(str(shard)))
    for name in sorted(weights):
        if "rotary_emb" in name:
            continue
        try:
            out_name = gguf_name(name)
        except KeyError:
            raise PipelineError(
                f"GGUF export does not know the tensor '{name}'",
                where=paths.display(model_dir),
                fix="set quantize.gguf_float=none",
            ) from None
        w = np.array(weights.pop(name).astype(mx.float32))
        if name.endswith("q_proj.weight"):
            w = permute_qk(w, heads)
        elif name.endswith("k_proj.weight"):
            w = permute_qk(w, kv_heads)
        writer.add_tensor(out_name, *_encode(w, target, float_type))
        count += 1
    return count


def _encode(w: np.ndarray, target, float_type: str):
    """A tensor as the GGUF stores it: 1-D tensors (norms) in float32, matrices in the chosen float type."""
    if w.ndim == 1 or target is np.float32:
        return (w.astype(np.float32),)
    if float_type == "bfloat16":
        packed = gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16)
        return packed, packed.shape, gguf.GGMLQuantizationType.BF16
    return (w.astype(target),)


def llama_quantization_types() -> dict[str, int]:
    """Every quantization type this llama.cpp build knows, by name (Q4_K_M, Q8_0, ...)."""
    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {name.removeprefix(prefix): getattr(llama_cpp, name) for name in dir(llama_cpp) if name.startswith(prefix)}


def check_quantization_types(names, where: str) -> None:
    known = llama_quantization_types()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PipelineError(
            f"llama.cpp does not know the quantization type {', '.join(unknown)}",
            where=where,
            fix=f"use one of: {', '.join(sorted(known))}",
        )


def quantize_gguf(source: Path, target: Path, type_name: str, threads: int) -> None:
    """Quantize a float GGUF with llama.cpp's own quantizer; its per-tensor chatter is kept out of the
    log unless it fails (then its last lines are the error)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_quantization_types()[type_name]
    params.nthread = threads
    with native_output() as output:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    logging.getLogger("quantize").debug("llama.cpp:\n%s", output.text)
    if status != 0 or not target.is_file():
        last = " / ".join(output.text.strip().splitlines()[-3:])
        raise PipelineError(
            f"llama.cpp failed to quantize to {type_name} (status {status}{': ' + last if last else ''})",
            where=paths.display(source),
            fix="check the float GGUF (`make quantize -B`) and the type name",
        )


class native_output:
    """Captures what C code writes to stdout/stderr (file descriptors 1 and 2) while active."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = [os.dup(1), os.dup(2)]
        for fd in (1, 2):
            os.dup2(self._file.fileno(), fd)
        return self

    def __exit__(self, *exc):
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
