"""Helpers the tests share."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import model as model_stage
import prepare
import train

REPO = Path(__file__).resolve().parents[1]


def error_line(caplog) -> str:
    """The one error line a stage logged (a test fails if there were none or several)."""
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    return errors[0]


def write_override(root: Path, text: str) -> Path:
    path = root / "config" / "override.yaml"
    path.write_text(text)
    return path


def make(root: Path, *args: str, check: bool = True, stdin: str = "") -> subprocess.CompletedProcess:
    """Run make in a project copy, its output captured (`stdin`: what it reads)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    env.pop("PIPELINE_ROOT", None)
    command = ["make", "--no-print-directory", *args]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, input=stdin)
    if check and result.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


FAST_TRAIN = [
    "train.iters=6",
    "train.steps_per_eval=3",
    "train.val_batches=1",
    "train.num_layers=2",
    "train.learning_rate=5e-3",
]


def trained(model_dir: Path, *extra: str) -> None:
    """model → prepare → a short train run of `model_dir` in the current test project."""

    assert model_stage.main([f"model.source={model_dir}"]) == 0
    assert prepare.main([]) == 0
    assert train.main([*FAST_TRAIN, *extra]) == 0


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file in the project but .venv, the model cache and Make's bookkeeping."""
    skip = {".venv", ".cache", ".state", "__pycache__"}
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if skip & set(rel.parts) or not path.is_file() or path.is_symlink():
            continue
        out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server(root, *args: str, env: dict | None = None):
    """`make serve` running in its own process group; stopped with SIGINT (Ctrl-C) on exit."""
    command = ["make", "--no-print-directory", "serve", *args]
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))} | (env or {})
    environment.pop("PIPELINE_ROOT", None)
    log = tempfile.TemporaryFile()  # not a pipe: a server that logs more than a pipe holds would block
    process = subprocess.Popen(command, cwd=root, env=environment, stdout=log, stderr=log, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the server dies with serve (PR_SET_PDEATHSIG)
                process.wait()
            log.seek(0)
            process.output = log.read().decode(errors="replace")
            log.close()


def wait_ready(port: int, process, headers=None, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "make serve ended before it answered"
        try:
            request("GET", port, "/v1/models", headers=headers)
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise AssertionError("the server did not answer in time")


def request(method: str, port: int, path: str, body: dict | None = None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    with urllib.request.urlopen(req, timeout=60) as response:
        return response.read().decode()
