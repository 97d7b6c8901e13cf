"""runs/<experiment>/run_manifest.yaml: the one document a person reads about how an experiment was made.

Gathered from the stage manifests (model, prepare, train, fuse, quantize, and eval's own as it
finishes), not recomputed: the full resolved config, every input with its sha256 (the dataset files,
the base model), the versions (Python, MLX, mlx-lm, llama-cpp-python and so llama.cpp, and the
sha256 of the requirements lock), where it ran (platform, device, BLAS, threads), the seeds, the
project's git commit, whether the tree was dirty and a digest of the pipeline's code files, each
stage's wall time and every output with its sha256. Validated by
config/schemas/experiment_manifest.schema.json; eval writes it with its outputs.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from pipeline import contracts, hashing, paths, runtime, stages
from pipeline.errors import ContractError

import yaml
from omegaconf import OmegaConf

SCHEMA = "experiment_manifest"
STAGES_BEFORE_EVAL = ("model", "prepare", "train", "fuse", "quantize")
PACKAGES = ("mlx", "mlx-lm", "mlx-metal", "mlx-cuda", "llama-cpp-python", "gguf", "transformers", "tokenizers", "numpy")
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MLX_NUM_THREADS", "PIPELINE_THREADS")


def path(experiment: str) -> Path:
    return paths.run_dir(experiment) / "run_manifest.yaml"


def gather(cfg, eval_stage: dict) -> dict:
    """The record of experiment `cfg.experiment.name`: its stages' manifests as they are on disk, and
    `eval_stage` ({"started_at", "wall_seconds", "inputs", "outputs"}) for the eval finishing now."""
    experiment = cfg.experiment.name
    manifests = {  # quantize may not have run: eval scores what artifacts.json lists
        name: stages.read_manifest(name, experiment)
        for name in STAGES_BEFORE_EVAL
        if name != "quantize" or stages.get(name).manifest_path(experiment).is_file()
    }
    stage_rows = [_stage_row(name, manifest, experiment) for name, manifest in manifests.items()]
    stage_rows.append({"stage": "eval", **eval_stage})
    record = {
        "schema_version": contracts.schema_version(SCHEMA),
        "experiment": experiment,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seeds": {"train": int(cfg.train.seed), "data": int(cfg.data.seed)},
        "inputs": {
            "data": [e for e in manifests["prepare"]["inputs"] if e["role"] == "source"],
            "base_model": [*manifests["model"]["inputs"], *manifests["model"]["outputs"]],
        },
        "environment": {
            **manifests["train"]["environment"],
            "python": platform.python_version(),
            "packages": package_versions(),
            "requirements_lock": lock_entry(),
            "cpu_count": os.cpu_count() or 0,
            "threads": {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ},
            "blas_library": runtime.blas_summary()["library"],
        },
        "code": code_state(),
        "stages": stage_rows,
        "wall_seconds": round(sum(row["wall_seconds"] for row in stage_rows), 3),
    }
    contracts.validate(record, SCHEMA, where=f"writing {paths.display(path(experiment))}")
    return record


def _stage_row(name: str, manifest: dict, experiment: str) -> dict:
    """One stage's times, inputs and outputs: those it still vouches for (a file a later stage rewrote,
    as quantize does fuse's artifacts.json, is listed under that stage)."""
    return {
        "stage": name,
        "started_at": manifest["started_at"],
        "wall_seconds": manifest["wall_seconds"],
        "inputs": manifest["inputs"],
        "outputs": stages.checked_outputs(name, manifest, experiment),
    }


def write(target: Path, record: dict) -> None:
    text = "# How this experiment was made (pipeline.run_record); its stage manifests hold the same facts.\n"
    text += yaml.safe_dump(record, sort_keys=False, allow_unicode=True, width=120)
    contracts.write_bytes_atomic(target, text.encode("utf-8"))


def read(source: Path) -> dict:
    """A run_manifest.yaml read back and validated (a bundle's, or an experiment's)."""
    try:
        record = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ContractError(f"cannot read the run manifest ({exc})", where=str(source)) from None
    contracts.validate(record, SCHEMA, where=str(source))
    return record


def lock_file() -> Path:
    """The requirements lock this environment was made from (the Makefile names it in PIPELINE_LOCK)."""
    return paths.ROOT / os.environ.get("PIPELINE_LOCK", "requirements.lock")


def lock_entry() -> dict:
    lock = lock_file()
    return {"path": paths.display(lock), "sha256": hashing.sha256_file(lock)}


CODE = ("Makefile", "requirements.in", "scripts", "config/default.yaml", "config/schemas", "config/templates")


def code_files() -> dict[str, Path]:
    """{project-relative path: file} of the pipeline's code, what a replay needs beside the lock."""
    found = {}
    for item in CODE:
        where = paths.ROOT / item
        files = [where] if where.is_file() else sorted(p for p in where.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" not in file.parts and file.suffix != ".pyc":
                found[file.relative_to(paths.ROOT).as_posix()] = file
    return found


def code_digest() -> str:
    return hashing.tree_digest_of({name: hashing.sha256_file(file) for name, file in code_files().items()})


def package_versions() -> dict:
    return {k: v for k, v in runtime.versions(PACKAGES).items() if k != "python"}


def git_state() -> dict:
    """The project's commit and whether tracked files differ from it; null outside a git checkout."""
    try:
        if Path(_git("rev-parse", "--show-toplevel")).resolve() != paths.ROOT.resolve():
            return {"commit": None, "dirty": None}  # inside some other checkout, not the project's own
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def code_state() -> dict:
    return {**git_state(), "files_sha256": code_digest(), "files": len(code_files())}


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=paths.ROOT, capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()
