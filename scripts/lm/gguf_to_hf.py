"""A llama GGUF converted to a Hugging Face / MLX model folder, without PyTorch.

MLX reads the GGUF (dequantizing Q4_0/Q4_1/Q8_0), tensors get their Hugging Face names, llama.cpp's
q/k row permutation is undone, and the tokenizer is rebuilt from the GGUF vocabulary and merges.
Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja
and generation_config.json.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.errors import PipelineError

import mlx.core as mx
import orjson
from tokenizers import AddedToken, Tokenizer, decoders, models

from lm import gguf_mapping
from lm.gguf_check import SUPPORTED_ARCHITECTURES


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    tensors, metadata = read_gguf(gguf_path)
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise PipelineError(
            f"GGUF architecture '{arch}' is not supported",
            where=paths.display(gguf_path),
            fix="supported architectures: " + ", ".join(SUPPORTED_ARCHITECTURES) + "; or give an HF/MLX model folder",
        )
    model_config = llama_config(metadata, tied="output.weight" not in tensors)
    weights = {gguf_mapping.hf_name(name): w for name, w in tensors.items() if gguf_mapping.hf_name(name)}
    weights = unpermute_qk(weights, model_config)
    weights = {name: w.astype(getattr(mx, dtype)) for name, w in weights.items()}
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    write_json_file(out_dir / "config.json", {**model_config, "torch_dtype": dtype})
    write_tokenizer(metadata, out_dir, model_config)


def read_gguf(gguf_path: Path) -> tuple[dict, dict]:
    """Tensors (quantized ones dequantized to float32) and metadata (arrays made Python values)."""
    try:
        raw, metadata = mx.load(str(gguf_path), return_metadata=True)
    except (RuntimeError, ValueError) as exc:  # what mlx raises for an unreadable file
        raise PipelineError(
            f"cannot read the GGUF file: {exc}",
            where=paths.display(gguf_path),
            fix="the file is corrupt or not GGUF: re-install it (`make distclean setup` for the builtin model) "
            "or fix model.source",
        ) from exc
    if not raw or "general.architecture" not in metadata:
        raise PipelineError(
            "cannot read the GGUF file: it has no tensors or no general.architecture",
            where=paths.display(gguf_path),
            fix="the file is corrupt or truncated: re-install it (`make distclean setup` for the builtin model) "
            "or fix model.source",
        )
    tensors = {}
    for name, value in raw.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name.removesuffix(".weight")
        if f"{base}.scales" in raw:
            # MLX keeps Q4_0/Q4_1/Q8_0 as its own quantized triplets with groups of 32.
            bits = value.shape[-1] // raw[f"{base}.scales"].shape[-1]
            value = mx.dequantize(value, raw[f"{base}.scales"], raw[f"{base}.biases"], group_size=32, bits=bits)
        tensors[name] = value.astype(mx.float32)
    return tensors, {key: _plain(value) for key, value in metadata.items()}


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def unpermute_qk(weights: dict, model_config: dict) -> dict:
    """Undo llama.cpp's convert-time row permutation of q_proj and k_proj."""
    heads = {"q_proj": model_config["num_attention_heads"], "k_proj": model_config["num_key_value_heads"]}
    out = {}
    for name, w in weights.items():
        proj = name.split(".")[-2]
        out[name] = gguf_mapping.unpermute_qk(w, heads[proj]) if proj in heads else w
    return out


def llama_config(metadata: dict, tied: bool) -> dict:
    def key(name, default=None):
        value = metadata.get(f"llama.{name}", default)
        if value is None:
            raise PipelineError(
                f"the GGUF has no llama.{name}",
                where="model conversion",
                fix="the file is incomplete: use another GGUF",
            )
        return value

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", hidden // heads),
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        # Without it mlx-lm assumes 10000; SmolLM2 uses 100000 and degrades badly with the default.
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "vocab_size": len(metadata["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }


def write_tokenizer(metadata: dict, out_dir: Path, model_config: dict) -> None:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json from the GGUF vocab."""
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise PipelineError(
            f"GGUF tokenizer model '{metadata.get('tokenizer.ggml.model')}' is not supported",
            where="model conversion",
            fix="only byte-level BPE (gpt2) vocabularies convert; give an HF/MLX model folder instead",
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type", [gguf_mapping.TOKEN_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = gguf_mapping.byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, token_types))
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in typed if kind == gguf_mapping.TOKEN_CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, kind in typed if kind == gguf_mapping.TOKEN_USER_DEFINED]
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))

    def token(key):
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    chat_template = metadata.get("tokenizer.chat_template")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding") or token("eos"),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_config["max_position_embeddings"],
    }
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
        (out_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    write_json_file(out_dir / "tokenizer_config.json", tokenizer_config)
    generation = {"bos_token_id": model_config["bos_token_id"], "eos_token_id": model_config["eos_token_id"]}
    write_json_file(out_dir / "generation_config.json", {k: v for k, v in generation.items() if v is not None})


def write_json_file(path: Path, value: dict) -> None:
    path.write_bytes(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")
