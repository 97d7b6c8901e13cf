"""What a GGUF file says about itself, read from its header only (no tensor data is loaded):
architecture, quantization (llama.cpp's file-type name), parameter count, tensor bytes, context length
and the metadata map. One reader for every stage: package's Modelfile and Docker image use it.
"""

from __future__ import annotations

import collections
from pathlib import Path

from pipeline import paths
from pipeline.errors import PipelineError

import gguf

MAX_METADATA_ARRAY = 10  # longer arrays (vocabularies, merges) are left out of the metadata map, as model-runner does


def read_header(gguf_path: Path) -> dict:
    """Architecture, quantization, parameter count, tensor bytes, context length and the metadata
    map (every key as a string, long arrays left out) of a GGUF, read from its header only."""
    reader = _open_gguf(Path(gguf_path))
    architecture = _field(reader, "general.architecture")
    model_bytes = Path(gguf_path).stat().st_size - reader.data_offset
    return {
        "architecture": architecture,
        "quantization": _quantization(reader),
        "parameters": sum(int(t.n_elements) for t in reader.tensors),
        "model_bytes": model_bytes,
        "context_length": _field(reader, f"{architecture}.context_length"),
        "tensors": len(reader.tensors),
        "metadata": _metadata_strings(reader),
    }


def _open_gguf(path: Path):
    where = paths.display(path)
    if not path.is_file():
        raise PipelineError(
            "GGUF file not found", where=where, fix="run `make quantize` first, or pass the path of an existing .gguf"
        )
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader fails with ValueError, IndexError or struct errors on non-GGUF bytes
        raise PipelineError(
            f"not a GGUF file ({type(exc).__name__}: {exc})",
            where=where,
            fix="pass a .gguf written by llama.cpp or `make quantize` (it starts with the bytes 'GGUF')",
        ) from exc


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return field.contents() if field is not None else default


def _quantization(reader) -> str:
    """llama.cpp's name for general.file_type (Q4_K_M, F16, ...), else the dominant tensor type."""
    file_type = _field(reader, "general.file_type")
    if file_type is None:
        return _dominant_tensor_type(reader.tensors)
    names = {int(t): t.name.removeprefix("MOSTLY_").removeprefix("ALL_") for t in gguf.LlamaFileType}
    return names.get(int(file_type) & ~int(gguf.LlamaFileType.GUESSED), f"file type {file_type}")


def _dominant_tensor_type(tensors) -> str:
    # The rule gguf-parser-go uses when a file has no general.file_type: the commonest type among
    # the block tensors, skipping F32 (norms) when anything else is there.
    blocks = [t for t in tensors if t.name.startswith("blk.")] or list(tensors)
    ranked = [name for name, _ in collections.Counter(t.tensor_type.name for t in blocks).most_common()]
    if not ranked:
        return "unknown"
    return ranked[1] if ranked[0] == "F32" and len(ranked) > 1 else ranked[0]


def _metadata_strings(reader) -> dict[str, str]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own entries for the header (version, counts)
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > MAX_METADATA_ARRAY:
            continue
        out[key] = _value_string(field.contents(), field.types)
    return out


def _value_string(value, types) -> str:
    if types[0] != gguf.GGUFValueType.ARRAY:
        return _scalar_string(value, types[0])
    if len(types) != 2:  # arrays of arrays: model-runner writes nothing for them
        return ""
    return ", ".join(_scalar_string(item, types[1]) for item in value)


def _scalar_string(value, value_type) -> str:
    if value_type in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
        return f"{value:f}"  # Go's %f, as model-runner formats floats
    if value_type == gguf.GGUFValueType.BOOL:
        return "true" if value else "false"
    return str(value)
