"""The package stage: what it packs follows eval's decision, the Modelfile and the Docker image carry that
GGUF with the policy's stops and sampling, and a changed input stops it with one line and nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile

from pipeline import contracts, paths

import pytest

import package
from helpers import error_line
from lm import docker as docker_export

GGUF = {"id": "main/main-f16.gguf", "kind": "gguf", "format": "gguf-f16", "bytes": 300, "path": "q/main-f16.gguf"}
Q4 = {"id": "main/main-Q4_K_M.gguf", "kind": "gguf", "format": "gguf-Q4_K_M", "bytes": 100, "path": "q/q4.gguf"}
MLX = {"id": "main/mlx-affine-8bit-g64", "kind": "mlx-quantized", "format": "mlx-affine-8", "bytes": 50, "path": "m"}
FUSED = {"id": "main/fused", "kind": "fused", "format": "mlx", "bytes": 600, "path": "runs/main/fused"}


def policy(ship: dict | None, candidates: list[dict], reason: str = "the rule") -> dict:
    shipped = None if ship is None else {k: ship[k] for k in ("id", "kind", "format", "path", "bytes")}
    return {"experiment": "main", "ship": shipped, "reason": reason, "candidates": [c["id"] for c in candidates]}


def test_the_gguf_the_policy_ships_is_packed():
    chosen, why = package.packed_gguf(policy(GGUF, [GGUF, Q4, FUSED]), [FUSED, GGUF, Q4])
    assert chosen is GGUF and "the artifact generation_policy.json ships" in why


def test_an_mlx_model_shipped_packs_the_smallest_gguf_that_qualified():
    chosen, why = package.packed_gguf(policy(MLX, [MLX, GGUF, Q4, FUSED]), [FUSED, MLX, GGUF, Q4])
    assert chosen is Q4 and "smallest GGUF that qualified" in why and MLX["id"] in why
    chosen, _ = package.packed_gguf(policy(MLX, [MLX, GGUF]), [FUSED, MLX, GGUF, Q4])
    assert chosen is GGUF  # Q4_K_M did not qualify: it is never packed


@pytest.mark.parametrize(
    "decision, expected",
    [
        (policy(MLX, [MLX, FUSED]), "no GGUF qualified"),
        (policy(None, [], reason="no shippable artifact is shown to be within 2 points"), "nothing ships (no ship"),
    ],
    ids=["no_gguf_qualified", "nothing_ships"],
)
def test_nothing_is_packed_when_no_gguf_qualified(decision, expected):
    chosen, why = package.packed_gguf(decision, [FUSED, MLX, GGUF])
    assert chosen is None and why.startswith("nothing packaged") and expected in why


def _layer_digests(image) -> dict[str, str]:
    """media type -> digest of each layer of the image manifest in a Docker Model Runner tarball."""
    with tarfile.open(image) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
    return {layer["mediaType"]: layer["digest"] for layer in manifest["layers"]}


def test_the_package_carries_the_shipped_gguf_with_the_policys_settings(finished_copy):
    policy_doc = contracts.read_json(paths.eval_dir("main") / "generation_policy.json", "generation_policy")
    details = contracts.read_json(paths.run_dir("main") / "package.manifest.json", "run_manifest")["details"]
    shipped = paths.resolve(policy_doc["ship"]["path"])
    assert policy_doc["ship"]["kind"] == "gguf" and details["gguf"]["id"] == policy_doc["ship"]["id"]
    folder = paths.run_dir("main") / "package"
    lines = (folder / "Modelfile").read_text().splitlines()
    from_line = next(line for line in lines if line.startswith("FROM "))
    assert (folder / from_line.removeprefix("FROM ")).resolve() == shipped.resolve()
    for stop in policy_doc["generation"]["stop_tokens"]:
        assert f'PARAMETER stop "{stop}"' in lines
    assert f"PARAMETER temperature {policy_doc['generation']['temperature']}" in lines
    digest = "sha256:" + hashlib.sha256(shipped.read_bytes()).hexdigest()
    image = folder / shipped.name.replace(".gguf", ".docker.tar")
    assert _layer_digests(image)[docker_export.GGUF_MEDIA_TYPE] == digest == details["docker"]["gguf_layer"]
    assert docker_export.validate_oci_layout(image) == []
    assert details["answer"]["tokens"] > 0


def test_a_gguf_changed_since_eval_stops_the_package(finished_copy, caplog):
    policy_doc = contracts.read_json(paths.eval_dir("main") / "generation_policy.json", "generation_policy")
    shipped = paths.resolve(policy_doc["ship"]["path"])
    before = {p.name: p.read_bytes() for p in (paths.run_dir("main") / "package").iterdir()}
    with open(shipped, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert package.main([]) == 2
    assert "the GGUF to package is changed since artifacts.json recorded it" in error_line(caplog)
    assert {p.name: p.read_bytes() for p in (paths.run_dir("main") / "package").iterdir()} == before


def test_a_template_changed_since_eval_stops_the_package(finished_copy, caplog):
    contract_path = paths.DATA_CONTRACT
    contract = contracts.read_json(contract_path, "data_contract")
    contract["template"]["sha256"] = "0" * 64
    contract_path.write_bytes(json.dumps(contract).encode())
    assert package.main([]) == 2
    assert "the chat template changed since eval scored the artifacts" in error_line(caplog)


def test_packaging_again_gives_the_same_bytes(finished_copy):
    folder = paths.run_dir("main") / "package"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    assert any(name.endswith(".docker.tar") for name in before) and "Modelfile" in before
    shutil.rmtree(folder)
    (paths.run_dir("main") / "package.manifest.json").unlink()
    assert package.main([]) == 0
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == before
