"""Bundles (pipeline.bundle): the same files give the same bytes; check names every tampered, missing or
unlisted file; thaw refuses crafted archives and writes nothing anywhere when it does."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import time

from pipeline import bundle
from pipeline.errors import PipelineError

import pytest


def sample(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapters.safetensors").write_bytes(os.urandom(4096))
    (folder / "adapter_config.json").write_text('{"rank": 8}\n')
    script = tmp_path / "repro.sh"
    script.write_text("#!/usr/bin/env bash\necho hi\n")
    script.chmod(0o755)
    return {
        **bundle.files_of(folder, "adapter"),
        "repro.sh": bundle.Source(path=script, executable=True),
        "README.md": bundle.Source(data=b"# hello\n"),
    }


def test_the_same_files_give_the_same_bytes(tmp_path):
    members = sample(tmp_path)
    first = tmp_path / "a.tar.gz"
    digest = bundle.write(first, members)
    for source in members.values():  # other mtimes, same content
        if source.path is not None:
            os.utime(source.path, (time.time() + 3600, time.time() + 3600))
    second = tmp_path / "b.tar.gz"
    assert bundle.write(second, members) == digest and first.read_bytes() == second.read_bytes()
    with gzip.open(first) as raw:
        assert raw.read(1)  # a valid gzip stream
    header = first.read_bytes()[:10]
    assert header[4:8] == b"\0\0\0\0"  # no timestamp in the gzip header
    with tarfile.open(first) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == sorted(i.name for i in infos if i.isdir()) + sorted(
        i.name for i in infos if i.isfile()
    )
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname) for i in infos} == {(bundle.MTIME, 0, 0, "", "")}
    modes = {i.name: i.mode for i in infos}
    assert modes["repro.sh"] == 0o755 and modes["README.md"] == 0o644 and modes["adapter"] == 0o755
    assert not any(i.pax_headers for i in infos)
    contents = bundle.check(first)
    assert contents.problems == [] and set(contents.files) == {*members, "SHA256SUMS"}


def _rewrite(source, out, change):
    """A copy of a bundle with `change(name, data) -> data` applied to each file's content."""
    with tarfile.open(source) as tar, tarfile.open(out, "w:gz", format=tarfile.GNU_FORMAT) as new:
        for info in tar.getmembers():
            data = tar.extractfile(info).read() if info.isfile() else None
            if data is not None:
                data = change(info.name, data)
                if data is None:
                    continue
                info.size = len(data)
            new.addfile(info, io.BytesIO(data) if data is not None else None)


def test_check_names_every_file_that_differs(tmp_path):
    good = tmp_path / "good.tar.gz"
    bundle.write(good, sample(tmp_path))

    def flip(name, data):
        if name == "adapter/adapters.safetensors":
            return data[:100] + bytes([data[100] ^ 1]) + data[101:]
        return None if name == "README.md" else data

    bad = tmp_path / "bad.tar.gz"
    _rewrite(good, bad, flip)
    problems = bundle.check(bad).problems
    assert len(problems) == 2
    assert problems[0] == "README.md: listed in SHA256SUMS but not in the bundle"
    assert problems[1].startswith("adapter/adapters.safetensors: sha256 ") and "SHA256SUMS says" in problems[1]
    dest = tmp_path / "dest"
    with pytest.raises(PipelineError, match="refused: README.md") as caught:
        bundle.thaw(bad, dest)
    assert "and 1 more problems" in caught.value.line() and not dest.exists()


def test_a_truncated_bundle_is_one_line_and_nothing_is_extracted(tmp_path):
    good = tmp_path / "good.tar.gz"
    bundle.write(good, sample(tmp_path))
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PipelineError, match="not a readable bundle") as caught:
        bundle.thaw(cut, tmp_path / "dest")
    assert "\n" not in caught.value.line() and not (tmp_path / "dest").exists()


def crafted(path, *members):
    """A .tar.gz of (TarInfo, data) pairs, with a SHA256SUMS that lists its regular files."""
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def info(name, kind=tarfile.REGTYPE, size=0, linkname=""):
    member = tarfile.TarInfo(name)
    member.type, member.size, member.linkname = kind, size, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        member.devmajor, member.devminor = 1, 3
    return member


ATTACKS = {
    "absolute_path": [(info("/tmp/pwned-abs", size=2), b"x\n")],
    "dotdot_escape": [(info("ok/../../pwned-dotdot", size=2), b"x\n")],
    "symlink_escape": [(info("link", tarfile.SYMTYPE, linkname="../../outside"), None)],
    "absolute_symlink": [(info("link", tarfile.SYMTYPE, linkname="/etc/passwd"), None)],
    "symlink_then_write_through_it": [
        (info("sub", tarfile.SYMTYPE, linkname=".."), None),
        (info("sub/pwned-through-link", size=2), b"x\n"),
    ],
    "hardlink_escape": [(info("hard", tarfile.LNKTYPE, linkname="../../etc/passwd"), None)],
    "device_file": [(info("null", tarfile.CHRTYPE), None)],
    "fifo": [(info("pipe", tarfile.FIFOTYPE), None)],
    "duplicate_member": [(info("model.gguf", size=2), b"a\n"), (info("model.gguf", size=2), b"b\n")],
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_thaw_refuses_a_crafted_archive_and_writes_nothing(tmp_path, attack):
    work = tmp_path / "work"
    dest = work / "dest"
    work.mkdir()
    archive = crafted(tmp_path / f"{attack}.tar.gz", *ATTACKS[attack])
    before = _tree(tmp_path)
    with pytest.raises(PipelineError, match="refused: ") as caught:
        bundle.thaw(archive, dest)
    line = caught.value.line()
    assert "\n" not in line and "nothing was extracted" in line
    assert _tree(tmp_path) == before and not dest.exists()
    assert not os.path.lexists("/tmp/pwned-abs")


def test_a_member_over_the_size_limit_is_refused(tmp_path):
    archive = crafted(tmp_path / "big.tar.gz", (info("big.bin", size=2048), b"x" * 2048))
    with pytest.raises(PipelineError, match="big.bin: 2,048 bytes, over the 1,024-byte limit"):
        bundle.thaw(archive, tmp_path / "dest", max_member_bytes=1024)
    assert not (tmp_path / "dest").exists()


def test_a_good_bundle_thaws_with_its_modes(tmp_path):
    good = tmp_path / "good.tar.gz"
    members = sample(tmp_path)
    bundle.write(good, members)
    dest = bundle.thaw(good, tmp_path / "dest")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(
        [*members, "SHA256SUMS"]
    )
    assert os.access(dest / "repro.sh", os.X_OK) and not os.access(dest / "README.md", os.X_OK)
    assert (dest / "adapter" / "adapter_config.json").read_text() == '{"rank": 8}\n'
    with pytest.raises(PipelineError, match="already in the destination"):
        bundle.thaw(good, dest)


def _tree(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_bundle_tarred_again_with_dot_slash_names_still_checks(tmp_path):
    """`tar czf x.tar.gz .` in an extracted bundle writes ./name: the same files, the same verdict."""
    good = tmp_path / "good.tar.gz"
    bundle.write(good, sample(tmp_path))
    retarred = tmp_path / "retarred.tar.gz"
    with tarfile.open(good) as tar, tarfile.open(retarred, "w:gz") as new:
        new.addfile(info(".", tarfile.DIRTYPE))
        for member in tar.getmembers():
            data = tar.extractfile(member).read() if member.isfile() else None
            member.name = "./" + member.name
            new.addfile(member, io.BytesIO(data) if data is not None else None)
    contents = bundle.check(retarred)
    assert contents.problems == [] and "SHA256SUMS" in contents.files and "repro.sh" in contents.files
    assert oct(good.stat().st_mode & 0o777) == "0o644"
