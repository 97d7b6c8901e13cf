"""train's checkpoints: what makes a run resumable. Checkpoints hold the trainable weights, the optimizer
state (moments, step, schedule position), MLX's RNG state and the loop's counters; metrics.jsonl is
cut back to the checkpoint on resume, so a resumed run's files equal an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path

from pipeline import contracts, hashing, paths
from pipeline.errors import PipelineError
from pipeline.manifest import output_entry

import mlx.core as mx
import orjson
from mlx.utils import tree_flatten, tree_unflatten

log = logging.getLogger("train")
KEEP_CHECKPOINTS = 2
CHECKPOINT_FILES = ("adapters.safetensors", "optimizer.safetensors", "state.json")


@dataclasses.dataclass
class LoopState:
    step: int = 0
    last_eval_step: int = -1
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_gain: int = 0
    val_losses: list = dataclasses.field(default_factory=list)
    stopped_early: bool = False
    trained_tokens: int = 0
    train_seconds: float = 0.0
    window_loss: float = 0.0  # the running report window, so a resumed run reports the same averages
    window_steps: int = 0


def fingerprint(
    model_manifest: dict,
    catalog: dict,
    adapter_config: dict,
    train_config: dict,
    start_sha256: str | None = None,
    world_size: int = 1,
) -> dict:
    """What a checkpoint must match to be resumed: the model, the data, the adapter shape, the settings,
    the adapter it started from (train.init_from) and the number of ranks (a run on another number sums
    its gradients in another order)."""
    settings = {k: v for k, v in train_config.items() if k not in ("resume", "steps_per_report")}
    return {
        "model": output_entry(model_manifest, "model")["sha256"],
        "data": hashing.sha256_json({s: catalog["splits"][s]["sha256"] for s in ("train", "valid")}),
        "adapter": hashing.sha256_json(adapter_config),
        "settings": hashing.sha256_json(settings),
        **({"start_adapter": start_sha256} if start_sha256 else {}),
        **({"world_size": world_size} if world_size > 1 else {}),
    }


class Checkpoints:
    def __init__(self, folder: Path, fingerprint: dict):
        self.folder, self.fingerprint = folder, fingerprint
        self.latest = folder / "latest.json"
        self.resumed_from: Path | None = None  # the checkpoint folder restore() loaded

    def best_weights(self) -> Path:
        return self.folder / "best" / "adapters.safetensors"

    def restore(self, model, optimizer, mode: str) -> LoopState:
        """The loop state to start from: a matching checkpoint's, or a fresh one."""
        saved = self._read_latest() if self.latest.is_file() and mode != "never" else None
        if mode == "never" or saved is None:
            if mode == "require":
                raise PipelineError(
                    "train.resume=require but there is no checkpoint",
                    where=paths.display(self.folder),
                    fix="set train.resume=auto",
                )
            return self._fresh()
        mismatch = [k for k in ("model", "adapter") if saved["fingerprint"][k] != self.fingerprint[k]]
        if mismatch and mode == "require":
            raise PipelineError(
                f"the checkpoint at step {saved['step']} was made with a different "
                f"{' and '.join('base model' if k == 'model' else 'LoRA shape' for k in mismatch)}",
                where=paths.display(self.folder),
                fix="set train.resume=auto to start over (the old checkpoints are replaced), or restore the "
                "settings it was made with",
            )
        if saved["fingerprint"] != self.fingerprint:
            keys = dict.fromkeys([*self.fingerprint, *saved["fingerprint"]])
            changed = [k for k in keys if saved["fingerprint"].get(k) != self.fingerprint.get(k)]
            if "world_size" in changed:
                before, now = saved["fingerprint"].get("world_size", 1), self.fingerprint.get("world_size", 1)
                changed[changed.index("world_size")] = f"the number of ranks: {before} then, {now} now"
            if mode == "require":
                raise PipelineError(
                    f"the checkpoint does not match this run ({', '.join(changed)} changed)",
                    where=paths.display(self.folder),
                    fix="set train.resume=auto to start over",
                )
            log.info(
                "checkpoints in %s are from other settings (%s changed): starting over",
                paths.display(self.folder),
                ", ".join(changed),
            )
            return self._fresh()
        return self._load(saved, model, optimizer)

    def _fresh(self) -> LoopState:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)  # a run too short to save a checkpoint still has the (empty) folder
        return LoopState()

    def _read_latest(self) -> dict:
        try:
            saved = orjson.loads(self.latest.read_bytes())
            if not isinstance(saved, dict) or not {"step", "path", "fingerprint"} <= saved.keys():
                raise ValueError("it lacks step, path or fingerprint")
            return saved
        except (orjson.JSONDecodeError, ValueError) as exc:
            raise self._damaged(self.latest, f"is not a checkpoint index ({exc})") from None

    def _load(self, saved: dict, model, optimizer) -> LoopState:
        folder = self.folder / saved["path"]
        self._verify(folder, saved.get("files", {}))
        try:
            state = load_folder(folder, model, optimizer)
        except (RuntimeError, ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            raise self._damaged(folder, f"cannot be read ({str(exc).splitlines()[0]})") from None
        self.resumed_from = folder
        log.info("resuming from step %d (%s)", state.step, paths.display(folder))
        return state

    def _verify(self, folder: Path, digests: dict) -> None:
        """Every file of the checkpoint is there with the sha256 recorded when it was saved."""
        for name in CHECKPOINT_FILES:
            path = folder / name
            if not path.is_file():
                raise self._damaged(path, "is missing")
            if name in digests and hashing.sha256_file(path) != digests[name]:
                raise self._damaged(path, "does not have the content it was saved with (sha256 differs)")

    def _damaged(self, path: Path, what: str) -> PipelineError:
        return PipelineError(
            f"the checkpoint file {what}",
            where=paths.display(path),
            fix=f"set train.resume=never to start over (or delete {paths.display(self.folder)})",
        )

    def save(self, model, optimizer, state: LoopState) -> None:
        name = f"step-{state.step:07d}"
        with contracts.atomic_dir(self.folder / name) as tmp:
            mx.save_safetensors(str(tmp / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
            arrays = dict(tree_flatten(optimizer.state))
            arrays["__rng__"] = mx.random.state[0]
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), arrays)
            (tmp / "state.json").write_bytes(orjson.dumps(dataclasses.asdict(state)))
            files = {file: hashing.sha256_file(tmp / file) for file in CHECKPOINT_FILES}
        latest = {"step": state.step, "path": name, "fingerprint": self.fingerprint, "files": files}
        contracts.write_bytes_atomic(self.latest, orjson.dumps(latest, option=orjson.OPT_INDENT_2))
        for old in sorted(self.folder.glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    def save_best(self, model, step: int) -> None:
        with contracts.atomic_dir(self.folder / "best") as tmp:
            mx.save_safetensors(str(tmp / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
            (tmp / "best.json").write_bytes(orjson.dumps({"step": step}))


def load_folder(folder: Path, model, optimizer) -> LoopState:
    """Weights, optimizer state and RNG from a checkpoint folder into `model` and `optimizer`; its loop state."""
    model.load_weights(list(mx.load(str(folder / "adapters.safetensors")).items()), strict=False)
    arrays = mx.load(str(folder / "optimizer.safetensors"))
    hi, lo = (int(v) for v in arrays.pop("__rng__").tolist())
    optimizer.state = tree_unflatten(list(arrays.items()))
    state = LoopState(**orjson.loads((folder / "state.json").read_bytes()))
    mx.random.seed((hi << 32) | lo)  # a seed of hi<<32|lo recreates the key [hi, lo]
    mx.eval(model.parameters(), optimizer.state)
    return state


def pack(folder: Path) -> bytes:
    """A checkpoint folder's files as one byte string (a JSON header line of names and sizes, then the files)."""
    contents = {name: (folder / name).read_bytes() for name in CHECKPOINT_FILES}
    header = orjson.dumps({name: len(data) for name, data in contents.items()})
    return header + b"\n" + b"".join(contents.values())


def load_packed(packed: bytes, model, optimizer) -> LoopState:
    """load_folder for a checkpoint given as pack()'s bytes."""
    header, _, body = packed.partition(b"\n")
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as tmp:
        offset = 0
        for name, size in orjson.loads(header).items():
            (Path(tmp) / name).write_bytes(body[offset : offset + size])
            offset += size
        return load_folder(Path(tmp), model, optimizer)


class MetricsLog:
    """metrics.jsonl: one validated line per report; cut back to the checkpoint at `keep_until` when a run
    resumes. The validation line of the checkpoint's own step is written after the checkpoint (it opens the
    next step), so the resumed run writes it again and the old one goes."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() and keep_until > 0 else []
        kept = [line for line in _whole_lines(lines, path) if _before_checkpoint(orjson.loads(line), keep_until)]
        path.parent.mkdir(parents=True, exist_ok=True)
        contracts.write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())

    def write(self, record: dict) -> None:
        record = {"schema_version": contracts.schema_version("metrics"), **record}
        contracts.validate(record, "metrics", where=paths.display(self.path))
        with open(self.path, "ab") as f:
            f.write(orjson.dumps(record) + b"\n")


def _before_checkpoint(record: dict, step: int) -> bool:
    return record["step"] < step or (record["step"] == step and record["type"] != "val")


def _whole_lines(lines: list[str], path: Path) -> list[str]:
    """The metric lines to keep; a last line cut short (the run was killed while appending it) is dropped."""
    whole = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: dropping the last line, cut short when the run stopped", paths.display(path))
                continue
            raise PipelineError(
                "a metrics line is not JSON",
                where=f"{paths.display(path)}:{number}",
                fix="set train.resume=never to start over",
            ) from None
        whole.append(line)
    return whole
