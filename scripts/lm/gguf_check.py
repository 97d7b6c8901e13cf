"""A GGUF file checked before any native code reads it, so a damaged file is one clear error, not a crash.

MLX's GGUF reader (gguflib, in C) trusts the file: a header cut short, or a count, length or offset
overwritten, makes it read outside the file and the process dies (SIGSEGV). check_gguf parses the
header here, every read checked against the file's size, then checks what the llama converter
(lm.gguf_to_hf) relies on: the magic and version, the metadata it reads, each tensor's type (one that
MLX reads and the converter dequantizes), each tensor's data inside the file, and the tensor names and
shapes that the architecture's hyperparameters imply.

Only the header is read (1.8 MB for SmolLM2-135M), never tensor data. The layout and the constants
are the gguf library's; its GGUFReader is not used because it makes a NumPy view per vocabulary string
and takes 2.3 s on a 49k-token vocabulary, where this takes a few hundredths of a second.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path

from pipeline.errors import PipelineError

import gguf
from gguf import GGMLQuantizationType as TensorType
from gguf import GGUFValueType as ValueType

SUPPORTED_ARCHITECTURES = ("llama",)
# What mx.load reads (Q4_0/Q4_1/Q8_0 as MLX quantized triplets) and lm.gguf_to_hf dequantizes.
CONVERTIBLE_TYPES = (
    TensorType.F32,
    TensorType.F16,
    TensorType.BF16,
    TensorType.Q4_0,
    TensorType.Q4_1,
    TensorType.Q8_0,
)
MAX_DIMS = 4  # GGML_MAX_DIMS
OPTIONAL_TENSORS = ("output.weight", "rope_freqs.weight")  # absent when tied / computed by Hugging Face models

DAMAGED = (
    "the file is damaged: download or copy it again (builtin models: `make distclean setup`), "
    "or set model.source to another GGUF"
)
UNSUPPORTED = "give an F32/F16/BF16/Q8_0/Q4_0/Q4_1 llama GGUF, or an HF/MLX model folder"

_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_SCALARS = {
    ValueType.UINT8: struct.Struct("<B"),
    ValueType.INT8: struct.Struct("<b"),
    ValueType.UINT16: struct.Struct("<H"),
    ValueType.INT16: struct.Struct("<h"),
    ValueType.UINT32: _U32,
    ValueType.INT32: struct.Struct("<i"),
    ValueType.FLOAT32: struct.Struct("<f"),
    ValueType.BOOL: struct.Struct("<?"),
    ValueType.UINT64: _U64,
    ValueType.INT64: struct.Struct("<q"),
    ValueType.FLOAT64: struct.Struct("<d"),
}
_INTEGERS = {ValueType.UINT8, ValueType.INT8, ValueType.UINT16, ValueType.INT16, ValueType.UINT32}
_INTEGERS |= {ValueType.INT32, ValueType.UINT64, ValueType.INT64}
_FLOATS = {ValueType.FLOAT32, ValueType.FLOAT64}
_WINDOW = 1 << 20


class Unusable(Exception):
    """What is wrong with the file, and how to fix it (check_gguf adds where)."""

    def __init__(self, what: str, fix: str = DAMAGED):
        super().__init__(what)
        self.what, self.fix = what, fix


@dataclasses.dataclass(frozen=True)
class Array:
    item_type: ValueType
    length: int


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # NumPy / Hugging Face order (GGUF writes the dims reversed)
    type_id: int
    offset: int  # from the start of the data section


@dataclasses.dataclass(frozen=True)
class Header:
    metadata: dict[str, object]  # arrays as Array (item type and length; their items are not kept)
    value_types: dict[str, ValueType]
    tensors: list[Tensor]
    data_start: int
    alignment: int
    file_size: int


def check_gguf(path: Path, where: str) -> None:
    """Raise PipelineError (where: `where`) unless the llama converter can read `path` without surprises."""
    try:
        header = parse_header(Path(path))
        check_layout(header)
        hparams = check_metadata(header)
        check_types(header)
        check_tensors(header, hparams)
    except Unusable as bad:
        raise PipelineError(bad.what, where=where, fix=bad.fix) from None
    except OSError as exc:
        raise PipelineError(f"cannot read the file: {exc.strerror}", where=where, fix="check model.source") from exc


class _Reader:
    """Little-endian values read in order from a file through a window, every read checked against its size."""

    def __init__(self, file, size: int):
        self.file, self.size, self.pos = file, size, 0
        self.part = "the header"  # what is being read, for the message when the file ends too soon
        self._window, self._start = b"", 0

    def view(self, n: int) -> tuple[bytes, int]:
        """The window holding the next n bytes, and where they start in it; moves past them."""
        end = self.pos + n
        if end > self.size:
            raise self.past_the_end()
        if self.pos < self._start or end > self._start + len(self._window):
            self.file.seek(self.pos)
            self._window, self._start = self.file.read(max(n, _WINDOW)), self.pos
            if len(self._window) < n:
                raise Unusable(f"the file shrank while it was read, inside {self.part}")
        at, self.pos = self.pos - self._start, end
        return self._window, at

    def past_the_end(self) -> Unusable:
        return Unusable(
            f"the header runs past the end of the file ({self.size:,} bytes) in {self.part}: "
            "the file is cut short or a length in it is overwritten"
        )

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise self.past_the_end()
        self.pos += n

    def unpack(self, fmt: struct.Struct):
        window, at = self.view(fmt.size)
        return fmt.unpack_from(window, at)[0]

    def string(self) -> str:
        length = self.unpack(_U64)
        window, at = self.view(length)
        try:
            return window[at : at + length].decode("utf-8")
        except UnicodeDecodeError:
            raise Unusable(f"a string in {self.part} is not valid UTF-8") from None

    def skip_strings(self, count: int) -> None:
        if count * _U64.size > self.size - self.pos:
            raise self.past_the_end()
        for _ in range(count):
            self.skip(self.unpack(_U64))


def parse_header(path: Path) -> Header:
    """The metadata and the tensor list of a GGUF, read from its header only."""
    size = path.stat().st_size
    if size == 0:
        raise Unusable("the GGUF file is empty (0 bytes)")
    with open(path, "rb") as file:
        reader = _Reader(file, size)
        _check_magic_and_version(reader)
        tensor_count, kv_count = reader.unpack(_U64), reader.unpack(_U64)
        metadata, value_types = _read_metadata(reader, kv_count)
        tensors = _read_tensor_infos(reader, tensor_count)
    alignment = _alignment(metadata, value_types)
    data_start = reader.pos + (-reader.pos % alignment)
    return Header(metadata, value_types, tensors, data_start, alignment, size)


def _check_magic_and_version(reader: _Reader) -> None:
    reader.part = "the magic number"
    if reader.size < 4 or reader.unpack(_U32) != gguf.GGUF_MAGIC:
        raise Unusable(
            "not a GGUF file: it does not start with the bytes 'GGUF'",
            fix="point model.source at a .gguf file (llama.cpp's format), or at an HF/MLX model folder",
        )
    reader.part = "the version number"
    version = reader.unpack(_U32)
    if version & 0xFFFF == 0 and version:
        raise Unusable("a big-endian GGUF: MLX reads only little-endian files", fix=UNSUPPORTED)
    if version not in gguf.READER_SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, gguf.READER_SUPPORTED_VERSIONS))
        raise Unusable(
            f"GGUF version {version} is not supported (supported: {supported})",
            fix=f"convert it with a current llama.cpp, or {UNSUPPORTED}",
        )
    reader.part = "the tensor and metadata counts"


def _read_metadata(reader: _Reader, count: int) -> tuple[dict, dict]:
    metadata, value_types = {}, {}
    for i in range(count):
        reader.part = f"metadata entry {i + 1:,} of {count:,}"
        key = reader.string()
        reader.part = f"metadata entry {i + 1:,} of {count:,} ({key})"
        if key in metadata:
            raise Unusable(f"the metadata key {key} appears twice")
        value_type = reader.unpack(_U32)
        metadata[key] = _read_value(reader, value_type)
        value_types[key] = ValueType(value_type)
    return metadata, value_types


def _read_value(reader: _Reader, value_type: int):
    if value_type == ValueType.STRING:
        return reader.string()
    if value_type in _SCALARS:
        return reader.unpack(_SCALARS[value_type])
    if value_type == ValueType.ARRAY:
        return _read_array(reader)
    raise Unusable(f"{reader.part} has the unknown value type {value_type}")


def _read_array(reader: _Reader) -> Array:
    item_type, length = reader.unpack(_U32), reader.unpack(_U64)
    if item_type == ValueType.STRING:
        reader.skip_strings(length)
    elif item_type in _SCALARS:
        reader.skip(length * _SCALARS[item_type].size)
    elif item_type == ValueType.ARRAY:
        raise Unusable(f"{reader.part} is an array of arrays, which MLX's GGUF reader refuses", fix=UNSUPPORTED)
    else:
        raise Unusable(f"{reader.part} is an array of the unknown value type {item_type}")
    return Array(ValueType(item_type), length)


def _read_tensor_infos(reader: _Reader, count: int) -> list[Tensor]:
    tensors, names = [], set()
    for i in range(count):
        reader.part = f"the tensor list (tensor {i + 1:,} of {count:,})"
        name = reader.string()
        if name in names:
            raise Unusable(f"the tensor {name} is listed twice")
        names.add(name)
        n_dims = reader.unpack(_U32)
        if n_dims > MAX_DIMS:
            raise Unusable(f"the tensor {name} has {n_dims:,} dimensions (GGUF allows at most {MAX_DIMS})")
        dims = [reader.unpack(_U64) for _ in range(n_dims)]
        type_id, offset = reader.unpack(_U32), reader.unpack(_U64)
        tensors.append(Tensor(name, tuple(reversed(dims)), type_id, offset))
    return tensors


def _alignment(metadata: dict, value_types: dict) -> int:
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata and value_types["general.alignment"] != ValueType.UINT32:
        raise Unusable("general.alignment is not a uint32")
    if alignment <= 0 or alignment & (alignment - 1):
        raise Unusable(f"general.alignment is {alignment}, not a power of two")
    return alignment


def tensor_bytes(tensor: Tensor) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[TensorType(tensor.type_id)]
    return math.prod(tensor.shape) // block_size * type_size


def check_layout(header: Header) -> None:
    """Every tensor has a known type, whole quantization blocks, and its data inside the file."""
    known = {t.value for t in TensorType}
    for tensor in header.tensors:
        if tensor.type_id not in known:
            raise Unusable(f"the tensor {tensor.name} has the unknown type id {tensor.type_id}")
        block_size = gguf.GGML_QUANT_SIZES[TensorType(tensor.type_id)][0]
        if 0 in tensor.shape or (tensor.shape and tensor.shape[-1] % block_size):
            raise Unusable(f"the tensor {tensor.name} has the shape {_shape(tensor.shape)}, invalid for its type")
        if tensor.offset % header.alignment:
            raise Unusable(f"the tensor {tensor.name}'s data offset is not a multiple of {header.alignment}")
        end = header.data_start + tensor.offset + tensor_bytes(tensor)
        if end > header.file_size:
            raise Unusable(
                f"the tensor {tensor.name}'s data ends at byte {end:,}, past the end of the file "
                f"({header.file_size:,} bytes)"
            )


def check_metadata(header: Header) -> dict[str, int]:
    """The architecture is supported and has the hyperparameters and vocabulary the converter reads."""
    metadata = header.metadata
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise Unusable("the GGUF has no general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise Unusable(
            f"GGUF architecture '{arch}' is not supported",
            fix="supported architectures: " + ", ".join(SUPPORTED_ARCHITECTURES) + "; or give an HF/MLX model folder",
        )
    hparams = {name: _integer(header, f"{arch}.{name}") for name in _REQUIRED_INTEGERS}
    for name in ("attention.head_count_kv", "attention.key_length"):
        if f"{arch}.{name}" in metadata:
            hparams[name] = _integer(header, f"{arch}.{name}")
    _number(header, f"{arch}.attention.layer_norm_rms_epsilon", required=True)
    _number(header, f"{arch}.rope.freq_base", required=False)
    hparams["vocab"] = _string_array(header, "tokenizer.ggml.tokens").length
    if metadata.get("tokenizer.ggml.model") == "gpt2":
        _string_array(header, "tokenizer.ggml.merges")
    _check_token_types(header, hparams["vocab"])
    return hparams


_REQUIRED_INTEGERS = (
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
)


def _integer(header: Header, key: str) -> int:
    if key not in header.metadata:
        raise Unusable(f"the GGUF has no {key}", fix=f"the file is incomplete: {UNSUPPORTED}")
    value = header.metadata[key]
    if header.value_types[key] not in _INTEGERS or value <= 0:
        raise Unusable(f"{key} is {value!r}, not a positive integer")
    return value


def _number(header: Header, key: str, required: bool) -> None:
    if key not in header.metadata:
        if required:
            raise Unusable(f"the GGUF has no {key}", fix=f"the file is incomplete: {UNSUPPORTED}")
        return
    if header.value_types[key] not in _FLOATS | _INTEGERS or not math.isfinite(header.metadata[key]):
        raise Unusable(f"{key} is {header.metadata[key]!r}, not a finite number")


def _string_array(header: Header, key: str) -> Array:
    value = header.metadata.get(key)
    if value is None:
        raise Unusable(f"the GGUF has no {key}", fix=f"the file is incomplete: {UNSUPPORTED}")
    if not isinstance(value, Array) or value.item_type != ValueType.STRING or value.length == 0:
        raise Unusable(f"{key} is not a list of strings")
    return value


def _check_token_types(header: Header, vocab: int) -> None:
    token_types = header.metadata.get("tokenizer.ggml.token_type")
    if token_types is None:
        return
    if not isinstance(token_types, Array) or token_types.item_type not in _INTEGERS or token_types.length != vocab:
        raise Unusable(f"tokenizer.ggml.token_type is not a list of {vocab:,} integers, one per token")


def check_types(header: Header) -> None:
    """Every tensor's type is one the converter handles (an unsupported, not a damaged, file)."""
    for tensor in header.tensors:
        tensor_type = TensorType(tensor.type_id)
        if tensor_type not in CONVERTIBLE_TYPES:
            raise Unusable(
                f"the tensor {tensor.name} is {tensor_type.name}, which the converter cannot dequantize",
                fix="re-quantize the model to Q8_0 (or Q4_0/Q4_1) with llama-quantize, or " + UNSUPPORTED,
            )


def expected_shapes(hparams: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The shape of every llama tensor, by GGUF name, that the hyperparameters imply."""
    hidden, ffn, vocab = hparams["embedding_length"], hparams["feed_forward_length"], hparams["vocab"]
    heads = hparams["attention.head_count"]
    kv_heads = hparams.get("attention.head_count_kv", heads)
    head_dim = hparams.get("attention.key_length", hidden // heads)
    if heads % kv_heads or head_dim % 2 or ("attention.key_length" not in hparams and hidden % heads):
        raise Unusable(
            f"the attention sizes do not fit together ({hidden} wide, {heads} heads, {kv_heads} KV heads, "
            f"head size {head_dim})"
        )
    layer = {
        "attn_norm": (hidden,),
        "attn_q": (heads * head_dim, hidden),
        "attn_k": (kv_heads * head_dim, hidden),
        "attn_v": (kv_heads * head_dim, hidden),
        "attn_output": (hidden, heads * head_dim),
        "ffn_norm": (hidden,),
        "ffn_gate": (ffn, hidden),
        "ffn_up": (ffn, hidden),
        "ffn_down": (hidden, ffn),
    }
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for block in range(hparams["block_count"]):
        shapes.update({f"blk.{block}.{part}.weight": shape for part, shape in layer.items()})
    return shapes


def check_tensors(header: Header, hparams: dict[str, int]) -> None:
    """The tensors are exactly the llama ones for llama.block_count blocks, each with its implied shape."""
    expected = expected_shapes(hparams)
    present = {tensor.name: tensor for tensor in header.tensors}
    missing = sorted(set(expected) - set(present) - set(OPTIONAL_TENSORS), key=_natural)
    if missing:
        raise Unusable(f"the GGUF lacks the tensor{'s' if len(missing) > 1 else ''} {_some(missing)}")
    unexpected = sorted(set(present) - set(expected) - set(OPTIONAL_TENSORS), key=_natural)
    if unexpected:
        raise Unusable(
            f"the GGUF has tensors a llama model with {hparams['block_count']} blocks does not: {_some(unexpected)}"
        )
    for name, tensor in present.items():
        if name in expected and tensor.shape != expected[name]:
            raise Unusable(
                f"the tensor {name} has the shape {_shape(tensor.shape)}, where the metadata implies "
                f"{_shape(expected[name])}"
            )


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "()"


def _some(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _natural(name: str) -> tuple:
    """blk.2 before blk.10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))
