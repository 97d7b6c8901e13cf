"""docker_export: the Docker Model Runner image of the tiny GGUF is a valid OCI layout with the spec's
media types and config, validation catches tampering, and bad input leaves no file behind."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import tarfile
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.hashing import sha256_file

import gguf
import mlx.core as mx
import numpy as np
import pytest

from fixtures.tiny_gguf import write_tiny_gguf
from fixtures.tiny_model import CHATML_TEMPLATE
from lm import docker as docker_export
from lm import gguf_header

REFERENCE = "ai/tiny:q8_0"
LICENSE = "MIT License\n\nPermission is hereby granted...\n"
CREATED = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf")


@pytest.fixture
def image(tmp_path, tiny_gguf) -> tuple[Path, dict]:
    out = tmp_path / "tiny.docker.tar"
    result = docker_export.write_model_image(tiny_gguf, CHATML_TEMPLATE, out, reference=REFERENCE, license_text=LICENSE)
    return out, result


# ---------------------------------------------------------------- tar helpers


def read_files(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def write_files(tar_path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(tar_path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def blob(files: dict[str, bytes], digest: str) -> bytes:
    return files["blobs/sha256/" + digest.removeprefix("sha256:")]


def index_of(files: dict[str, bytes]) -> dict:
    return json.loads(files["index.json"])


def manifest_of(files: dict[str, bytes]) -> dict:
    return json.loads(blob(files, index_of(files)["manifests"][0]["digest"]))


def config_of(files: dict[str, bytes]) -> dict:
    return json.loads(blob(files, manifest_of(files)["config"]["digest"]))


def store_manifest(files: dict[str, bytes], manifest: dict) -> None:
    """Put an edited manifest back consistently: new blob, index.json and manifest.json pointing at it."""
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    index = index_of(files)
    del files["blobs/sha256/" + index["manifests"][0]["digest"].removeprefix("sha256:")]
    files[f"blobs/sha256/{digest}"] = data
    files["manifest.json"] = data
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(data))
    files["index.json"] = json.dumps(index).encode()


def tampered(image, edit) -> list[str]:
    out, _ = image
    files = read_files(out)
    edit(files)
    write_files(out, files)
    return docker_export.validate_oci_layout(out)


# ---------------------------------------------------------------- the written image


def test_image_is_a_valid_oci_layout(image):
    out, result = image
    files = read_files(out)
    assert docker_export.validate_oci_layout(out) == []
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = index_of(files)
    assert index["schemaVersion"] == 2 and index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    [descriptor] = index["manifests"]
    assert descriptor["annotations"]["org.opencontainers.image.ref.name"] == REFERENCE
    assert descriptor["digest"] == result["manifest_digest"] and result["reference"] == REFERENCE
    assert files["manifest.json"] == blob(files, descriptor["digest"])  # what `docker model load` reads
    assert result["bytes"] == out.stat().st_size
    assert not list(out.parent.glob(".*.tmp"))


def test_every_descriptor_matches_its_blob(image):
    files = read_files(image[0])
    manifest = manifest_of(files)
    descriptors = [index_of(files)["manifests"][0], manifest["config"], *manifest["layers"]]
    for descriptor in descriptors:
        data = blob(files, descriptor["digest"])
        assert descriptor["size"] == len(data)
        assert descriptor["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()


def test_manifest_and_layer_media_types(image, tiny_gguf):
    manifest = manifest_of(read_files(image[0]))
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.docker.ai.model.config.v0.1+json"
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        "application/vnd.docker.ai.gguf.v3",
        "application/vnd.docker.ai.license",
        "application/vnd.docker.ai.chat.template.jinja",
    ]
    gguf_layer = manifest["layers"][0]
    assert gguf_layer["digest"] == "sha256:" + sha256_file(tiny_gguf)
    assert gguf_layer["size"] == tiny_gguf.stat().st_size
    assert gguf_layer["annotations"]["org.opencontainers.image.title"] == tiny_gguf.name
    assert gguf_layer["annotations"]["org.cncf.model.filepath"] == tiny_gguf.name
    assert (
        json.loads(gguf_layer["annotations"]["org.cncf.model.file.metadata+json"])["size"] == tiny_gguf.stat().st_size
    )


def test_template_and_license_layers_hold_the_text(image):
    files = read_files(image[0])
    license_layer, template_layer = manifest_of(files)["layers"][1:]
    assert blob(files, template_layer["digest"]).decode() == CHATML_TEMPLATE
    assert blob(files, license_layer["digest"]).decode() == LICENSE
    assert template_layer["annotations"]["org.cncf.model.filepath"] == "template.jinja"


def test_config_is_filled_from_the_gguf_header(image, tiny_model_dir):

    files = read_files(image[0])
    config_file = config_of(files)
    config = config_file["config"]
    weights = mx.load(str(tiny_model_dir / "model.safetensors"))
    n_params = sum(w.size for w in weights.values())  # tied embeddings: the GGUF has the same tensors
    assert config["format"] == "gguf" and config["architecture"] == "llama"
    assert config["quantization"] == "Q8_0"  # no general.file_type in the fixture: the dominant block type
    assert config["parameters"] == docker_export.parameters_label(n_params) == f"{n_params / 1e3:.2f} K"
    assert config["size"].endswith("KiB")
    assert config["gguf"]["general.architecture"] == "llama"
    assert config["gguf"]["llama.context_length"] == "512"
    assert config["gguf"]["llama.attention.layer_norm_rms_epsilon"] == "0.000010"
    assert "tokenizer.ggml.tokens" not in config["gguf"]  # arrays over 10 items stay out, as in model-runner
    layer_digests = [layer["digest"] for layer in manifest_of(files)["layers"]]
    assert config_file["rootfs"] == {"type": "rootfs", "diff_ids": layer_digests}
    assert dt.datetime.fromisoformat(config_file["descriptor"]["created"].replace("Z", "+00:00")).tzinfo


def test_parameter_count_is_the_tensor_element_sum(tiny_gguf, tiny_model_dir):

    weights = mx.load(str(tiny_model_dir / "model.safetensors"))
    header = gguf_header.read_header(tiny_gguf)
    assert header["parameters"] == sum(w.size for w in weights.values())
    assert header["architecture"] == "llama" and header["context_length"] == 512


def test_quantization_name_comes_from_general_file_type(tmp_path):

    path = tmp_path / "typed.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_header.read_header(path)["quantization"] == "Q4_K_M"


def test_no_template_and_no_license_gives_one_layer(tmp_path, tiny_gguf):
    out = tmp_path / "plain.tar"
    docker_export.write_model_image(tiny_gguf, None, out, reference="ai/tiny")
    assert docker_export.validate_oci_layout(out) == []
    assert [layer["mediaType"] for layer in manifest_of(read_files(out))["layers"]] == [
        "application/vnd.docker.ai.gguf.v3"
    ]


def test_same_input_and_time_give_the_same_bytes(tmp_path, tiny_gguf):
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    for out in (first, second):
        docker_export.write_model_image(tiny_gguf, CHATML_TEMPLATE, out, reference=REFERENCE, created=CREATED)
    assert first.read_bytes() == second.read_bytes()
    assert config_of(read_files(first))["descriptor"]["created"] == "2025-01-02T03:04:05Z"


def test_pure_oci_archive_has_no_model_runner_manifest(tmp_path, tiny_gguf):
    out = tmp_path / "oci.tar"
    docker_export.write_model_image(tiny_gguf, None, out, reference=REFERENCE, model_runner_manifest=False)
    assert "manifest.json" not in read_files(out)
    assert docker_export.validate_oci_layout(out) == []


@pytest.mark.parametrize(
    ("count", "label"),
    [(0, "0"), (999, "999"), (134_520_000, "134.52 M"), (7_000_000_000, "7 B"), (1_234, "1.23 K")],
)
def test_parameters_label(count, label):
    assert docker_export.parameters_label(count) == label


@pytest.mark.parametrize(
    ("count", "label"),
    [(0, "0 B"), (512, "512 B"), (268_800_000, "256.35 MiB"), (1_000_000_000, "1 GB"), (3 * 2**30, "3 GiB")],
)
def test_bytes_label(count, label):
    assert docker_export.bytes_label(count) == label


# ---------------------------------------------------------------- tampering


def test_a_changed_blob_byte_is_reported(image):
    def flip_a_gguf_byte(files):
        name = "blobs/sha256/" + manifest_of(files)["layers"][0]["digest"].removeprefix("sha256:")
        data = bytearray(files[name])
        data[len(data) // 2] ^= 0xFF
        files[name] = bytes(data)

    [problem] = tampered(image, flip_a_gguf_byte)
    assert "content hashes to sha256:" in problem and "not to its name" in problem


def test_a_missing_blob_is_reported(image):
    def drop_the_template(files):
        del files["blobs/sha256/" + manifest_of(files)["layers"][2]["digest"].removeprefix("sha256:")]

    [problem] = tampered(image, drop_the_template)
    assert "layers[2]" in problem and "is missing" in problem


def test_a_wrong_descriptor_size_is_reported(image):
    def shrink_the_gguf_size(files):
        manifest = manifest_of(files)
        manifest["layers"][0]["size"] -= 1
        store_manifest(files, manifest)

    [problem] = tampered(image, shrink_the_gguf_size)
    assert "layers[0]" in problem and "size says" in problem


def test_a_wrong_layer_media_type_is_reported(image):
    def relabel_the_gguf(files):
        manifest = manifest_of(files)
        manifest["layers"][0]["mediaType"] = "application/octet-stream"
        store_manifest(files, manifest)

    problems = tampered(image, relabel_the_gguf)
    assert any("layers[0]" in p and "application/octet-stream" in p for p in problems)
    assert any("no layer holds model weights" in p for p in problems)


def test_a_wrong_config_media_type_is_reported(image):
    def relabel_the_config(files):
        manifest = manifest_of(files)
        manifest["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json"
        store_manifest(files, manifest)

    [problem] = tampered(image, relabel_the_config)
    assert "config" in problem and "application/vnd.oci.image.config.v1+json" in problem


def test_a_wrong_manifest_schema_version_is_reported(image):
    def bump_schema(files):
        manifest = manifest_of(files)
        manifest["schemaVersion"] = 3
        store_manifest(files, manifest)

    [problem] = tampered(image, bump_schema)
    assert "schemaVersion is 3" in problem


def test_a_malformed_digest_is_reported(image):
    def uppercase_the_digest(files):
        manifest = manifest_of(files)
        manifest["layers"][1]["digest"] = manifest["layers"][1]["digest"].upper()
        store_manifest(files, manifest)

    problems = tampered(image, uppercase_the_digest)
    assert any("layers[1]" in p and "not sha256:<64 lowercase hex>" in p for p in problems)


def test_a_missing_oci_layout_file_is_reported(image):
    assert tampered(image, lambda files: files.pop("oci-layout")) == ["oci-layout: missing"]


def test_a_stale_model_runner_manifest_is_reported(image):
    def edit_manifest_json(files):
        files["manifest.json"] = files["manifest.json"].replace(b'"schemaVersion":2', b'"schemaVersion": 2')

    [problem] = tampered(image, edit_manifest_json)
    assert problem.startswith("manifest.json:")


def test_diff_ids_out_of_step_with_layers_are_reported(image):
    def reorder_layers(files):
        manifest = manifest_of(files)
        manifest["layers"][1], manifest["layers"][2] = manifest["layers"][2], manifest["layers"][1]
        store_manifest(files, manifest)

    [problem] = tampered(image, reorder_layers)
    assert "rootfs.diff_ids" in problem


def test_a_symlink_member_is_reported(image):
    out, _ = image
    with tarfile.open(out, "a") as tar:
        link = tarfile.TarInfo("blobs/sha256/link")
        link.type, link.linkname = tarfile.SYMTYPE, "../../index.json"
        tar.addfile(link)
    problems = docker_export.validate_oci_layout(out)
    assert any("not a regular file" in p for p in problems)


def test_a_file_that_is_not_a_tar_is_reported(tmp_path):
    bogus = tmp_path / "bogus.tar"
    bogus.write_bytes(b"not a tar at all" * 100)
    [problem] = docker_export.validate_oci_layout(bogus)
    assert "not a readable uncompressed tar" in problem


# ---------------------------------------------------------------- bad input


def test_a_non_gguf_input_raises_and_writes_nothing(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF" * 64)
    out = tmp_path / "out" / "model.tar"
    with pytest.raises(PipelineError) as caught:
        docker_export.write_model_image(fake, CHATML_TEMPLATE, out, reference=REFERENCE)
    assert "not a GGUF file" in str(caught.value) and "fix:" in str(caught.value)
    assert not out.exists()
    assert not (out.parent.exists() and any(out.parent.iterdir()))


def test_a_failure_while_writing_leaves_the_old_tar_alone(tmp_path, tiny_gguf, monkeypatch):
    out = tmp_path / "model.tar"
    out.write_bytes(b"previous build")

    def fail_midway(tar, name, data, mtime):
        raise OSError("disk full")

    monkeypatch.setattr(docker_export, "_add_bytes", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        docker_export.write_model_image(tiny_gguf, CHATML_TEMPLATE, out, reference=REFERENCE)
    assert out.read_bytes() == b"previous build"
    assert [p.name for p in tmp_path.iterdir()] == ["model.tar"]


@pytest.mark.parametrize("reference", ["", "AI/Tiny:latest", "ai/tiny:", "ai//tiny", "ai/tiny latest"])
def test_a_bad_reference_is_refused(tmp_path, tiny_gguf, reference):
    out = tmp_path / "model.tar"
    with pytest.raises(PipelineError, match="not a usable image reference"):
        docker_export.write_model_image(tiny_gguf, None, out, reference=reference)
    assert not out.exists()


def test_equal_license_and_template_share_one_blob(tmp_path, tiny_gguf):
    out = tmp_path / "same.tar"
    docker_export.write_model_image(tiny_gguf, "same text", out, reference=REFERENCE, license_text="same text")
    assert docker_export.validate_oci_layout(out) == []
    layers = manifest_of(read_files(out))["layers"]
    assert layers[1]["digest"] == layers[2]["digest"]
