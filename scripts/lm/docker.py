"""The Docker export: a GGUF packed as a Docker Model Runner model, an OCI image-layout tarball
for `docker model load`.

What the tar holds:

    oci-layout          {"imageLayoutVersion": "1.0.0"}
    index.json          an image index with one manifest descriptor, annotated with the reference
    blobs/sha256/<hex>  the GGUF, the license and the chat template (one layer each, uncompressed),
                        the model config and the image manifest
    manifest.json       the manifest's bytes again: `docker model load` reads the manifest from here

Sources. The media types and the config are Docker's model spec, github.com/docker/model-spec
(spec.md: media types and example manifests; config.md: the config JSON), as implemented in
github.com/docker/model-runner, pkg/distribution/: types/config.go (config fields and media types),
internal/partial/layer.go (layer annotations), internal/gguf/create.go and internal/mutate/model.go
(rootfs.diff_ids, descriptor.created), tarball/reader.go and distribution/client.go LoadModel (what
`docker model load` reads). The human-readable parameter count and size are formatted the way its
GGUF parser does (github.com/gpustack/gguf-parser-go, scalar.go). The layout rules are the OCI image
spec (github.com/opencontainers/image-spec: image-layout.md, descriptor.md, manifest.md,
annotations.md).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

from pipeline import paths
from pipeline.contracts import atomic_path
from pipeline.errors import PipelineError
from pipeline.hashing import sha256_file

import orjson

from lm.gguf_header import read_header

OCI_LAYOUT_VERSION = "1.0.0"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.ai.model.config.v0.1+json"
CONFIG_MEDIA_TYPES = {CONFIG_MEDIA_TYPE, "application/vnd.docker.ai.model.config.v0.2+json"}
GGUF_MEDIA_TYPE = "application/vnd.docker.ai.gguf.v3"
LICENSE_MEDIA_TYPE = "application/vnd.docker.ai.license"
CHAT_TEMPLATE_MEDIA_TYPE = "application/vnd.docker.ai.chat.template.jinja"
WEIGHT_MEDIA_TYPES = {GGUF_MEDIA_TYPE, "application/vnd.docker.ai.safetensors", "application/vnd.docker.ai.dduf"}
LAYER_MEDIA_TYPES = WEIGHT_MEDIA_TYPES | {
    LICENSE_MEDIA_TYPE,
    CHAT_TEMPLATE_MEDIA_TYPE,
    "application/vnd.docker.ai.gguf.v3.lora",
    "application/vnd.docker.ai.gguf.v3.mmproj",  # the spec's name for a projector
    "application/vnd.docker.ai.mmproj",  # model-runner's name for the same
    "application/vnd.docker.ai.vllm.config.tar",
    "application/vnd.docker.ai.dir.tar",
}
MODEL_FORMATS = {"gguf", "safetensors", "diffusers"}

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
TITLE_ANNOTATION = "org.opencontainers.image.title"
FILEPATH_ANNOTATION = "org.cncf.model.filepath"
FILE_METADATA_ANNOTATION = "org.cncf.model.file.metadata+json"
MEDIATYPE_UNTESTED_ANNOTATION = "org.cncf.model.file.mediatype.untested"

TEMPLATE_FILE_NAME = "template.jinja"  # the name model-runner unpacks a template layer to
LICENSE_FILE_NAME = "LICENSE"
MODEL_RUNNER_MANIFEST = "manifest.json"

JSON_LIMIT = 16 << 20  # index, manifest and config blobs are small; keep their bytes to parse them
CHUNK = 1 << 20

DIGEST = re.compile(r"sha256:([a-f0-9]{64})")
MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_REF_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
REF_NAME = re.compile(rf"{_REF_COMPONENT}(?:/{_REF_COMPONENT})*")  # annotations.md grammar
BLOB_NAME = re.compile(r"blobs/([^/]+)/([^/]+)")

_PARAMETER_UNITS = [(1e15, "Q"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")]
_BYTE_UNITS = [
    (2**50, "Pi"),
    (1e15, "P"),
    (2**40, "Ti"),
    (1e12, "T"),
    (2**30, "Gi"),
    (1e9, "G"),
    (2**20, "Mi"),
    (1e6, "M"),
    (2**10, "Ki"),
    (1e3, "K"),
]


def parameters_label(count: int) -> str:
    """'134.52 M', '7 B': decimal units, two decimals, '.00' dropped (gguf-parser-go's format)."""
    return _scaled(count, _PARAMETER_UNITS, "")


def bytes_label(count: int) -> str:
    """'256.35 MiB', '1 GB', '512 B': the first binary or decimal unit the size reaches (gguf-parser-go)."""
    return _scaled(count, _BYTE_UNITS, "B") if count else "0 B"


def _scaled(count: int, units, suffix: str) -> str:
    if count == 0:
        return "0"
    base, unit = next(((b, u) for b, u in units if count >= b), (1, ""))
    number = f"{count / base:.2f}".removesuffix(".00")
    return f"{number} {unit}{suffix}".strip()


# ---------------------------------------------------------------- writing


@dataclasses.dataclass
class Blob:
    """One blob of the layout: its descriptor, and where its bytes come from (a file or memory)."""

    media_type: str
    digest: str
    size: int
    source: Path | bytes
    annotations: dict[str, str] | None = None

    def descriptor(self) -> dict:
        out = {"mediaType": self.media_type, "size": self.size, "digest": self.digest}
        if self.annotations:
            out["annotations"] = self.annotations
        return out

    @property
    def tar_name(self) -> str:
        return "blobs/" + self.digest.replace(":", "/", 1)


def write_model_image(
    gguf_path: Path,
    chat_template: str | None,
    out_tar: Path,
    *,
    reference: str,
    license_text: str | None = None,
    created: dt.datetime | None = None,
    model_runner_manifest: bool = True,
) -> dict:
    """Write `out_tar` atomically: an OCI image layout of a Docker Model Runner model made of the GGUF,
    the chat template (skipped when None or empty) and the license text (when given).

    `created` (default now) is the config's creation time and every tar entry's mtime; pass a fixed
    one for byte-identical rebuilds. `model_runner_manifest` adds the root manifest.json that
    `docker model load` needs; turn it off for a pure OCI archive for containerd / `docker load`,
    whose importer rejects a manifest.json in this shape.

    Returns the manifest digest, the reference, the model config and the tar's size in bytes.
    """
    gguf_path, out_tar = Path(gguf_path), Path(out_tar)
    _check_reference(reference)
    header = read_header(gguf_path)
    created = (created or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)

    layers = [gguf_layer(gguf_path, created)]
    if license_text:
        layers.append(text_layer(license_text, LICENSE_MEDIA_TYPE, LICENSE_FILE_NAME, created))
    if chat_template:
        layers.append(text_layer(chat_template, CHAT_TEMPLATE_MEDIA_TYPE, TEMPLATE_FILE_NAME, created))
    config = model_config(header, [layer.digest for layer in layers], created)
    config_blob = bytes_blob(_json_bytes(config), CONFIG_MEDIA_TYPE)
    manifest_blob = bytes_blob(_json_bytes(image_manifest(config_blob, layers)), MANIFEST_MEDIA_TYPE)

    entries = [*layers, config_blob, manifest_blob]
    root_files = {
        "oci-layout": _json_bytes({"imageLayoutVersion": OCI_LAYOUT_VERSION}),
        "index.json": _json_bytes(image_index(manifest_blob, reference)),
    }
    if model_runner_manifest:
        root_files[MODEL_RUNNER_MANIFEST] = manifest_blob.source
    with atomic_path(out_tar) as tmp:
        _write_tar(tmp, entries, root_files, mtime=int(created.timestamp()))
    return {
        "reference": reference,
        "manifest_digest": manifest_blob.digest,
        "config_digest": config_blob.digest,
        "config": config,
        "layers": [layer.descriptor() for layer in layers],
        "bytes": out_tar.stat().st_size,
    }


def _check_reference(reference: str) -> None:
    repository = reference.rsplit(":", 1)[0] if ":" in reference.rsplit("/", 1)[-1] else reference
    if not REF_NAME.fullmatch(reference) or repository != repository.lower():
        raise PipelineError(
            f"'{reference}' is not a usable image reference",
            where="docker reference",
            fix="use lowercase name components and an optional tag, e.g. ai/my-model:q4_k_m",
        )


def gguf_layer(gguf_path: Path, created: dt.datetime) -> Blob:
    """The GGUF as a layer, hashed by streaming; its bytes are copied into the tar later, from disk. Its
    recorded mtime is `created`, not the file's, so a rebuild of the same GGUF gives the same layer."""
    stat = gguf_path.stat()
    annotations = _file_annotations(gguf_path.name, stat.st_size, stat.st_mode & 0o777, created)
    return Blob(GGUF_MEDIA_TYPE, f"sha256:{sha256_file(gguf_path)}", stat.st_size, gguf_path, annotations)


def text_layer(text: str, media_type: str, file_name: str, created: dt.datetime) -> Blob:
    data = text.encode("utf-8")
    blob = bytes_blob(data, media_type)
    blob.annotations = _file_annotations(file_name, len(data), 0o644, created)
    return blob


def bytes_blob(data: bytes, media_type: str) -> Blob:
    return Blob(media_type, f"sha256:{hashlib.sha256(data).hexdigest()}", len(data), data)


def _file_annotations(name: str, size: int, mode: int, mtime: dt.datetime) -> dict[str, str]:
    # model-runner's layer annotations (internal/partial/layer.go), plus the OCI title.
    metadata = {"name": name, "mode": mode, "uid": 0, "gid": 0, "size": size, "mtime": _rfc3339(mtime), "typeflag": 0}
    return {
        FILEPATH_ANNOTATION: name,
        FILE_METADATA_ANNOTATION: json.dumps(metadata, separators=(",", ":")),
        MEDIATYPE_UNTESTED_ANNOTATION: "false",
        TITLE_ANNOTATION: name,
    }


def model_config(header: dict, diff_ids: list[str], created: dt.datetime) -> dict:
    """The application/vnd.docker.ai.model.config.v0.1+json object, fields in model-runner's order."""
    return {
        "config": {
            "format": "gguf",
            "quantization": header["quantization"],
            "parameters": parameters_label(header["parameters"]),
            "architecture": header["architecture"],
            "size": bytes_label(header["model_bytes"]),
            "gguf": header["metadata"],
        },
        "descriptor": {"created": _rfc3339(created)},
        "rootfs": {"type": "rootfs", "diff_ids": diff_ids},
    }


def image_manifest(config_blob: Blob, layers: list[Blob]) -> dict:
    # No artifactType: model-runner sets one only for CNCF ModelPack images; for Docker's format the
    # config media type says what the artifact is (OCI artifacts guidance).
    return {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config_blob.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }


def image_index(manifest_blob: Blob, reference: str) -> dict:
    descriptor = {**manifest_blob.descriptor(), "annotations": {REF_NAME_ANNOTATION: reference}}
    return {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [descriptor]}


def _json_bytes(obj) -> bytes:
    return orjson.dumps(obj)


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _write_tar(path: Path, blobs: list[Blob], root_files: dict[str, bytes], mtime: int) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as tar:
        _add_bytes(tar, "oci-layout", root_files["oci-layout"], mtime)
        for folder in ("blobs", "blobs/sha256"):
            tar.addfile(_tar_info(folder, 0, mtime, tarfile.DIRTYPE))
        for blob in {blob.tar_name: blob for blob in blobs}.values():  # equal texts share one blob
            if isinstance(blob.source, Path):
                with open(blob.source, "rb") as f:
                    tar.addfile(_tar_info(blob.tar_name, blob.size, mtime), f)
            else:
                _add_bytes(tar, blob.tar_name, blob.source, mtime)
        for name, data in root_files.items():
            if name != "oci-layout":
                _add_bytes(tar, name, data, mtime)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    tar.addfile(_tar_info(name, len(data), mtime), io.BytesIO(data))


def _tar_info(name: str, size: int, mtime: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.type = size, mtime, kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


# ---------------------------------------------------------------- validation


@dataclasses.dataclass
class Member:
    size: int
    sha256: str
    head: bytes  # the first bytes, to check a GGUF layer's magic
    data: bytes | None  # the whole content when small enough to be JSON worth parsing


class _Check:
    """One validation run: the tar's regular files, and every problem found so far."""

    def __init__(self, members: dict[str, Member], problems: list[str]):
        self.members, self.problems = members, problems

    def problem(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")

    def json_file(self, name: str):
        member = self.members.get(name)
        if member is None:
            self.problem(name, "missing")
            return None
        return _parse_json(self, member, name)


def validate_oci_layout(tar_path: Path) -> list[str]:
    """Every violation of the OCI image layout and of Docker's model spec in the tar (empty: valid).

    Reads the tar once, hashing every file as it streams past, so a multi-GB GGUF costs one read.
    """
    tar_path = Path(tar_path)
    problems: list[str] = []
    members = _scan_tar(tar_path, problems)
    if members is None:
        return problems
    check = _Check(members, problems)
    _check_blob_names(check)
    _check_oci_layout_file(check)
    manifests = _check_index(check)
    _check_model_runner_manifest(check, manifests)
    return problems


def _scan_tar(tar_path: Path, problems: list[str]) -> dict[str, Member] | None:
    where = paths.display(tar_path)
    if not tar_path.is_file():
        problems.append(f"{where}: file not found")
        return None
    members: dict[str, Member] = {}
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for info in tar:
                _scan_member(tar, info, members, problems)
    except (tarfile.TarError, EOFError, OSError) as exc:
        problems.append(f"{where}: not a readable uncompressed tar ({exc})")
        return None
    return members


def _scan_member(tar: tarfile.TarFile, info: tarfile.TarInfo, members: dict[str, Member], problems: list[str]) -> None:
    name = info.name.removeprefix("./").rstrip("/")
    if name.startswith("/") or ".." in name.split("/"):
        problems.append(f"{info.name}: path leaves the layout")
        return
    if info.isdir():
        return
    if not info.isfile():
        problems.append(f"{name}: not a regular file (tar type {info.type!r}); a layout holds files and folders only")
        return
    if name in members:
        problems.append(f"{name}: appears twice in the tar")
    members[name] = _read_member(tar.extractfile(info), info.size)


def _read_member(stream, size: int) -> Member:
    digest, head, kept = hashlib.sha256(), b"", []
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        head = head or chunk[:8]
        if size <= JSON_LIMIT:
            kept.append(chunk)
    return Member(size, digest.hexdigest(), head, b"".join(kept) if size <= JSON_LIMIT else None)


def _check_blob_names(check: _Check) -> None:
    """Each blobs/<alg>/<encoded> holds content with that digest (image-layout.md, Blobs)."""
    if not any(name.startswith("blobs/") for name in check.members):
        check.problem("blobs", "no blobs in the layout")
    for name, member in check.members.items():
        if not name.startswith("blobs/"):
            continue
        match = BLOB_NAME.fullmatch(name)
        if not match or match[1] != "sha256" or not DIGEST.fullmatch(f"sha256:{match[2]}"):
            check.problem(name, "not named blobs/sha256/<64 lowercase hex>")
        elif member.sha256 != match[2]:
            check.problem(name, f"content hashes to sha256:{member.sha256}, not to its name")


def _check_oci_layout_file(check: _Check) -> None:
    layout = check.json_file("oci-layout")
    if layout is None:
        return
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        check.problem("oci-layout", "not a JSON object with an imageLayoutVersion")
    elif layout["imageLayoutVersion"] != OCI_LAYOUT_VERSION:
        check.problem(
            "oci-layout", f"imageLayoutVersion is {layout['imageLayoutVersion']!r}, not {OCI_LAYOUT_VERSION!r}"
        )


def _check_index(check: _Check) -> list[Member]:
    """index.json and, through its descriptors, each manifest, config and layer. Returns the manifests."""
    index = check.json_file("index.json")
    if index is None:
        return []
    if not isinstance(index, dict):
        check.problem("index.json", "not a JSON object")
        return []
    _check_versioned(check, index, "index.json", INDEX_MEDIA_TYPE)
    descriptors = index.get("manifests")
    if not isinstance(descriptors, list) or not descriptors:
        check.problem("index.json", "manifests is not a non-empty list")
        return []
    manifests = []
    for i, descriptor in enumerate(descriptors):
        where = f"index.json manifests[{i}]"
        member = _check_descriptor(check, descriptor, where, {MANIFEST_MEDIA_TYPE})
        _check_ref_name(check, descriptor, where)
        if member is not None:
            manifests.append(member)
            _check_manifest(check, member, f"manifest {descriptor['digest']}")
    return manifests


def _check_versioned(check: _Check, document: dict, where: str, media_type: str) -> None:
    if document.get("schemaVersion") != 2 or isinstance(document.get("schemaVersion"), bool):
        check.problem(where, f"schemaVersion is {document.get('schemaVersion')!r}, not 2")
    if document.get("mediaType") != media_type:
        check.problem(where, f"mediaType is {document.get('mediaType')!r}, not {media_type}")


def _check_descriptor(check: _Check, descriptor, where: str, media_types: set[str]) -> Member | None:
    """A descriptor's fields (descriptor.md), and that its blob is there with the size it states."""
    if not isinstance(descriptor, dict):
        check.problem(where, "descriptor is not a JSON object")
        return None
    media_type, digest, size = descriptor.get("mediaType"), descriptor.get("digest"), descriptor.get("size")
    if not isinstance(media_type, str) or not MEDIA_TYPE.fullmatch(media_type):
        check.problem(where, f"mediaType {media_type!r} is not an RFC 6838 media type")
    elif media_type not in media_types:
        check.problem(where, f"mediaType {media_type!r} is not one of: {', '.join(sorted(media_types))}")
    _check_annotations(check, descriptor.get("annotations"), where)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        check.problem(where, f"size {size!r} is not a non-negative integer")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        check.problem(where, f"digest {digest!r} is not sha256:<64 lowercase hex>")
        return None
    member = check.members.get(f"blobs/sha256/{digest.removeprefix('sha256:')}")
    if member is None:
        check.problem(where, f"blob {digest} is missing from blobs/sha256/")
    elif isinstance(size, int) and size != member.size:
        check.problem(where, f"size says {size} bytes but blob {digest} has {member.size}")
    return member


def _check_annotations(check: _Check, annotations, where: str) -> None:
    if annotations is None:
        return
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        check.problem(where, "annotations is not a map of strings")


def _check_ref_name(check: _Check, descriptor, where: str) -> None:
    annotations = descriptor.get("annotations") if isinstance(descriptor, dict) else None
    ref_name = annotations.get(REF_NAME_ANNOTATION) if isinstance(annotations, dict) else None
    if isinstance(ref_name, str) and not REF_NAME.fullmatch(ref_name):
        check.problem(where, f"{REF_NAME_ANNOTATION} {ref_name!r} does not follow the annotations.md grammar")


def _check_manifest(check: _Check, member: Member, where: str) -> None:
    manifest = _parse_json(check, member, where)
    if not isinstance(manifest, dict):
        return
    _check_versioned(check, manifest, where, MANIFEST_MEDIA_TYPE)
    config_member = _check_descriptor(check, manifest.get("config"), f"{where} config", CONFIG_MEDIA_TYPES)
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        check.problem(where, "layers is not a non-empty list")
        return
    for i, layer in enumerate(layers):
        _check_layer(check, layer, f"{where} layers[{i}]")
    types = [layer.get("mediaType") for layer in layers if isinstance(layer, dict)]
    if not WEIGHT_MEDIA_TYPES.intersection(types):
        check.problem(where, "no layer holds model weights (gguf, safetensors or dduf)")
    if config_member is not None:
        _check_model_config(check, config_member, layers, f"{where} config")


def _check_layer(check: _Check, layer, where: str) -> None:
    member = _check_descriptor(check, layer, where, LAYER_MEDIA_TYPES)
    if member is not None and layer.get("mediaType") == GGUF_MEDIA_TYPE and not member.head.startswith(b"GGUF"):
        check.problem(where, "a GGUF layer whose blob does not start with the GGUF magic")


def _parse_json(check: _Check, member: Member, where: str):
    if member.data is None:
        check.problem(where, f"{member.size} bytes, too large for a JSON document")
        return None
    try:
        return json.loads(member.data)
    except (ValueError, UnicodeDecodeError) as exc:
        check.problem(where, f"not valid JSON ({exc})")
        return None


def _check_model_config(check: _Check, member: Member, layers: list, where: str) -> None:
    """The fields model-runner decodes into types.ConfigFile must have its types, or it cannot read them."""
    config_file = _parse_json(check, member, where)
    if not isinstance(config_file, dict):
        if config_file is not None:
            check.problem(where, "not a JSON object")
        return
    config = config_file.get("config")
    if not isinstance(config, dict):
        check.problem(where, "config is not an object")
    else:
        _check_config_fields(check, config, layers, where)
    _check_rootfs(check, config_file.get("rootfs"), layers, where)
    descriptor = config_file.get("descriptor")
    created = descriptor.get("created") if isinstance(descriptor, dict) else None
    if created is not None and not _is_rfc3339(created):
        check.problem(where, f"descriptor.created {created!r} is not an RFC 3339 time")


def _check_config_fields(check: _Check, config: dict, layers: list, where: str) -> None:
    if config.get("format") not in MODEL_FORMATS:
        check.problem(where, f"config.format {config.get('format')!r} is not one of {', '.join(sorted(MODEL_FORMATS))}")
    for key in ("format", "quantization", "parameters", "architecture", "size"):
        if key in config and not isinstance(config[key], str):
            check.problem(where, f"config.{key} is not a string")
    for key in ("gguf", "safetensors", "diffusers"):
        value = config.get(key)
        if value is not None and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            check.problem(where, f"config.{key} is not a map of strings")
    if config.get("format") == "gguf" and not any(
        isinstance(layer, dict) and layer.get("mediaType") == GGUF_MEDIA_TYPE for layer in layers
    ):
        check.problem(where, "config.format is gguf but no layer is a GGUF")


def _check_rootfs(check: _Check, rootfs, layers: list, where: str) -> None:
    # Layers are uncompressed (spec.md), so each diff_id is the layer's own digest.
    if not isinstance(rootfs, dict) or rootfs.get("type") != "rootfs":
        check.problem(where, "rootfs is not an object of type 'rootfs'")
        return
    expected = [layer.get("digest") for layer in layers if isinstance(layer, dict)]
    if rootfs.get("diff_ids") != expected:
        check.problem(where, "rootfs.diff_ids do not list the layer digests in layer order")


def _is_rfc3339(value) -> bool:
    if not isinstance(value, str) or "T" not in value:
        return False
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None
    except ValueError:
        return False


def _check_model_runner_manifest(check: _Check, manifests: list[Member]) -> None:
    """`docker model load` takes its manifest from a root manifest.json: it must be the indexed one."""
    member = check.members.get(MODEL_RUNNER_MANIFEST)
    if member is not None and member.sha256 not in {m.sha256 for m in manifests}:
        check.problem(MODEL_RUNNER_MANIFEST, "differs from the manifest index.json points to")
