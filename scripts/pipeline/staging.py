"""A stage's outputs are written to staging paths and swapped in together, or not at all.

Each output `P` is written at `P.parent/.staging-<stage>[-<experiment>]/P.name` (same file system as
`P`, so the swap is a rename). `commit` first writes a journal listing every swap, moves the old
manifest and old outputs aside, moves the new ones in, writes the new manifest, and deletes the journal:
that deletion is the commit point. A failure during the swap rolls back at once; a process killed during
it leaves the journal, and the next run of the stage rolls back from it before doing anything. Either
way the previous outputs and their manifest come back byte for byte, and no manifest ever lists an
output whose sha256 differs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline import contracts, paths
from pipeline.errors import PipelineError

import orjson

log = logging.getLogger("pipeline")


def staging_folder(parent: Path, stage: str, experiment: str | None) -> Path:
    return Path(parent) / (f".staging-{stage}-{experiment}" if experiment else f".staging-{stage}")


def run_key(stage: str, experiment: str | None) -> str | None:
    """What tells two runs of a stage apart: the experiment, or for a shared stage the model or
    prepared-data variant it makes (paths.use_variant); None for the workspace's own."""
    if experiment:
        return experiment
    return {"model": paths.MODEL_VARIANT, "prepare": paths.DATA_VARIANT}.get(stage)


class Staging:
    def __init__(self, stage: str, experiment: str | None):
        self.stage, self.experiment, self.key = stage, experiment, run_key(stage, experiment)
        self.journal = paths.STATE_DIR / "commits" / (f"{stage}-{self.key}.json" if self.key else f"{stage}.json")
        self.staged: dict[Path, Path] = {}  # final path -> where it is being written
        self._lock = _exclusive_lock(self.journal.with_suffix(".lock"), stage, experiment)
        self.recover()

    def path(self, final: Path, keep: bool = False) -> Path:
        """Where to write `final`. Unless `keep` (work a resumed run continues), it starts out absent."""
        final = Path(final)
        staged = staging_folder(final.parent, self.stage, self.key) / final.name
        if not keep:
            remove(staged)
        staged.parent.mkdir(parents=True, exist_ok=True)
        self.staged[final] = staged
        return staged

    def source(self, final: Path) -> Path:
        """Where `final`'s new content is now: its staging path, or the path itself if not staged."""
        final = Path(final)
        for staged_final, staged in self.staged.items():
            if final == staged_final or staged_final in final.parents:
                return staged / final.relative_to(staged_final)
        return final

    def commit(self, manifest_path: Path, write_manifest: Callable[[Path], object]) -> None:
        """Swap every staged output and the manifest in; on any failure put the old ones back."""
        swaps = [self._swap(final, staged) for final, staged in self.staged.items()]
        manifest_swap = self._swap(Path(manifest_path), None)
        contracts.write_bytes_atomic(self.journal, orjson.dumps([manifest_swap, *swaps], option=orjson.OPT_INDENT_2))
        try:
            _set_aside(manifest_swap)
            for swap in swaps:
                _set_aside(swap)
                os.replace(swap["staged"], swap["final"])
            write_manifest(Path(manifest_path))
        except BaseException:
            _roll_back_all([manifest_swap, *swaps])
            self.journal.unlink()
            raise
        self.journal.unlink()
        for swap in [manifest_swap, *swaps]:
            remove(Path(swap["old"]))
        for folder in {Path(s["old"]).parent for s in [manifest_swap, *swaps]}:
            _remove_if_empty(folder)

    def recover(self) -> None:
        """Undo a commit that did not finish (the journal is still there): the old outputs come back."""
        if not self.journal.is_file():
            return
        try:
            swaps = orjson.loads(self.journal.read_bytes())
        except orjson.JSONDecodeError:  # the journal itself was being written: nothing was moved yet
            self.journal.unlink()
            return
        _roll_back_all(swaps)
        self.journal.unlink()
        log.warning(
            "%s: an earlier run was stopped while replacing its outputs; the previous ones are back", self.stage
        )

    def _swap(self, final: Path, staged: Path | None) -> dict:
        old = staging_folder(final.parent, self.stage, self.key) / f"{final.name}.old"
        return {
            "final": str(final),
            "staged": str(staged) if staged else None,
            "old": str(old),
            "had_old": final.exists(),
        }


def _set_aside(swap: dict) -> None:
    if swap["had_old"]:
        Path(swap["old"]).parent.mkdir(parents=True, exist_ok=True)
        remove(Path(swap["old"]))
        os.replace(swap["final"], swap["old"])


def _roll_back_all(swaps: list[dict]) -> None:
    for swap in reversed(swaps):
        final, old = Path(swap["final"]), Path(swap["old"])
        if os.path.lexists(old):
            remove(final)
            os.replace(old, final)
        elif not swap["had_old"] and not (swap["staged"] and Path(swap["staged"]).exists()):
            remove(final)  # the new output (or manifest) of a run that never committed


def _exclusive_lock(path: Path, stage: str, experiment: str | None):
    """Held until the process ends (a kill releases it too): one run of a stage per experiment at a time."""
    if path in _HELD_LOCKS:  # this process runs the stage again (tests do): it already holds the lock
        return _HELD_LOCKS[path]
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        owner = f" of experiment '{experiment}'" if experiment else ""
        raise PipelineError(
            f"another {stage} run{owner} is in progress",
            where=paths.display(path),
            fix="wait for it to finish (or stop it); two runs would overwrite each other's outputs",
        ) from None
    _HELD_LOCKS[path] = handle
    return handle


_HELD_LOCKS: dict[Path, object] = {}


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
