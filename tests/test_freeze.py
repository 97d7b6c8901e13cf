"""make freeze / verify / thaw on a finished tiny run: the same experiment frozen twice is the same bytes;
verify names any file changed inside (even with SHA256SUMS rewritten to match), a lock that is not the
recorded one, a newer manifest; thaw extracts only a bundle that verifies."""

from __future__ import annotations

import hashlib
import io
import tarfile

from pipeline import bundle, contracts, frozen

import pytest
import yaml

from helpers import make


@pytest.fixture
def frozen_copy(finished_copy):
    make(finished_copy, "freeze")
    return finished_copy


def the_bundle(project):
    found = sorted((project / "dist").glob("main-*.tar.gz"))
    assert len(found) == 1, found
    return found[0]


def rewrite(source, out, change, fix_sums: bool):
    """A copy of a bundle with `change(name, data) -> data` applied to each file (None drops it);
    `fix_sums`: SHA256SUMS rewritten to match, as someone covering their tracks would."""
    with tarfile.open(source) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    changed = {}
    for name, data in files.items():
        if name != bundle.CHECKSUMS and (new := change(name, data)) is not None:
            changed[name] = new
    sums = files[bundle.CHECKSUMS]
    if fix_sums:
        sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(changed.items())).encode()
    changed[bundle.CHECKSUMS] = sums
    with tarfile.open(out, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        for name, data in sorted(changed.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def flip_adapter_byte(name, data):
    if name.endswith("adapters.safetensors"):
        return data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]
    return data


def test_freeze_twice_gives_the_same_bytes_and_verify_passes(frozen_copy):
    first = the_bundle(frozen_copy)
    content = first.read_bytes()
    manifest = contracts.read_json(frozen_copy / "dist" / "main.freeze.manifest.json", "run_manifest")
    assert manifest["details"]["sha256"] == hashlib.sha256(content).hexdigest()
    first.unlink()
    (frozen_copy / "dist" / "main.freeze.manifest.json").unlink()
    make(frozen_copy, "freeze")
    assert the_bundle(frozen_copy) == first and first.read_bytes() == content

    result = make(frozen_copy, "verify", f"BUNDLE={first}")
    assert "OK" in result.stderr and "FAIL" not in result.stderr
    contents = bundle.check(first)
    names = set(contents.files)
    policy = contracts.read_json(frozen_copy / "eval_out" / "main" / "generation_policy.json", "generation_policy")
    assert policy["ship"]["path"] in names and "runs/main/run_manifest.yaml" in names
    assert {"config.yaml", "README.md", "requirements.lock", "SHA256SUMS", "data/data_contract.json"} <= names
    assert any(n.startswith("runs/main/adapter/") for n in names)
    assert not {n for n in names if n.endswith((".jsonl",))}  # no data unless freeze.include_data
    assert not any(n.startswith(("runs/main/checkpoints", "runs/main/fused")) for n in names)


def test_verify_names_a_changed_adapter_byte_even_with_matching_checksums(frozen_copy, tmp_path):
    good = the_bundle(frozen_copy)
    for fix_sums in (False, True):
        bad = rewrite(good, tmp_path / f"bad-{fix_sums}.tar.gz", flip_adapter_byte, fix_sums)
        result = make(frozen_copy, "verify", f"BUNDLE={bad}", check=False)
        assert result.returncode != 0 and "verify] Error 1" in result.stderr  # verify's own exit code: 1
        fails = [line for line in result.stderr.splitlines() if "FAIL" in line]
        if not fix_sums:
            assert any("runs/main/adapter/adapters.safetensors: sha256" in line for line in fails), fails
        assert any("runs/main/adapter: sha256" in line and "run manifest records" in line for line in fails), fails
        dest = tmp_path / f"dest-{fix_sums}"
        thawed = make(frozen_copy, "thaw", f"BUNDLE={bad}", f"DEST={dest}", check=False)
        assert thawed.returncode != 0 and "thaw] Error 2" in thawed.stderr and not dest.exists()


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            lambda n, d: d + b"# edited\n" if n == "requirements.lock" else d,
            "requirements.lock: sha256 ",
        ),
        (
            lambda n, d: (
                yaml.safe_dump({**yaml.safe_load(d), "schema_version": 99}).encode()
                if n.endswith("run_manifest.yaml")
                else d
            ),
            "schema version 99 is newer than this pipeline reads (1)",
        ),
        (
            lambda n, d: None if n.endswith("run_manifest.yaml") else d,
            "runs/*/run_manifest.yaml: the bundle holds no single run manifest",
        ),
    ],
    ids=["other_lock", "newer_manifest", "no_manifest"],
)
def test_a_bundle_that_does_not_match_its_manifest_is_refused(frozen_copy, tmp_path, change, expected):
    bad = rewrite(the_bundle(frozen_copy), tmp_path / "bad.tar.gz", change, fix_sums=True)
    record, problems = frozen.verify(bad)
    assert any(expected in p for p in problems), problems
    dest = tmp_path / "dest"
    result = make(frozen_copy, "thaw", f"BUNDLE={bad}", f"DEST={dest}", check=False)
    assert result.returncode != 0 and expected in result.stderr and not dest.exists()


def test_a_thawed_bundle_holds_the_recorded_files(frozen_copy, tmp_path):
    dest = tmp_path / "elsewhere"
    make(frozen_copy, "thaw", f"BUNDLE={the_bundle(frozen_copy)}", f"DEST={dest}")
    record = yaml.safe_load((dest / "runs" / "main" / "run_manifest.yaml").read_text())
    train = next(r for r in record["stages"] if r["stage"] == "train")
    adapter = next(e for e in train["outputs"] if e["role"] == "adapter")
    from pipeline.hashing import sha256_tree

    assert sha256_tree(dest / adapter["path"]) == adapter["sha256"]
    readme = (dest / "README.md").read_text()
    assert "runs/main/quantized/main-f16.gguf" in readme and "make verify" in readme
