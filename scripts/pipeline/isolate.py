"""A function run in a fresh Python process, so a crash in native code cannot take the stage down silently.

`call(function, *args, name=..., where=..., fix=...)` starts `python -m pipeline.isolate` (the same
interpreter and sys.path; importing this package loads the fast BLAS before the function's modules
import MLX), runs the function there and returns its result. What the child raises is raised here: a
PipelineError as the same one line, any other exception as itself when it can be pickled (else as
IsolatedError), with the child's traceback as its cause. A child killed by a signal (SIGSEGV, SIGBUS,
...) becomes a PipelineError naming `name` and the signal.

`Worker` is such a child kept for one call after another, so that a series of calls pays the
interpreter's start and the imports (~2 s with MLX) once. A crash ends that call as `call` would, and
the worker's next call starts a new child.

A subprocess rather than multiprocessing: spawn would re-import the parent's __main__ (the stage with
mlx-lm and the hub client, or pytest) in the child, and fork is unsafe once MLX has started threads.
Arguments and the result travel as pickles in a temporary folder; the function must be importable.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from pipeline.errors import PipelineError

_SCRIPTS_DIR = Path(__file__).resolve().parents[1]  # the folder holding the pipeline package


class IsolatedError(RuntimeError):
    """An exception in the child that could not be sent back as itself."""


class ChildTraceback(Exception):
    """The child's traceback, as the cause of what the parent raises (the error log shows it)."""


def call(function, *args, name: str, where: str, fix: str, env: dict[str, str] | None = None):
    """function(*args) in a child process (with `env` added to its environment); its result, or what it
    raised, or a PipelineError if it crashed."""
    with Worker(env) as worker:
        return worker.call(function, *args, name=name, where=where, fix=fix)


class Worker:
    """A child process that runs calls one after another, each as `call` would run it."""

    def __init__(self, env: dict[str, str] | None = None):
        self.env, self.child, self.done = env, None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, function, *args, name: str, where: str, fix: str):
        if self.child is None:
            self._start()
        with tempfile.TemporaryDirectory(prefix="pipeline-isolate-") as folder:
            request, reply = Path(folder) / "request.pickle", Path(folder) / "reply.pickle"
            request.write_bytes(pickle.dumps((list(sys.path), pickle.dumps((function, args)))))
            try:
                self.child.stdin.write(f"{request}\n{reply}\n".encode())
                self.child.stdin.flush()
                finished = self.done.readline()
            except BrokenPipeError:
                finished = b""
            if not finished:  # the child ended during the call
                code = self._reap()
                if code < 0:
                    raise PipelineError(f"{name} crashed ({_signal_name(-code)})", where=where, fix=fix)
                raise IsolatedError(f"{name} exited with status {code} and no result")
            return _unpack(pickle.loads(reply.read_bytes()))

    def close(self) -> None:
        if self.child is not None:
            self.child.stdin.close()
            self._reap()

    def _start(self) -> None:
        done_read, done_write = os.pipe()
        self.child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.isolate", "--serve", str(done_write)],
            env=_child_environment() | (self.env or {}),
            stdin=subprocess.PIPE,
            pass_fds=(done_write,),
        )
        os.close(done_write)
        self.done = os.fdopen(done_read, "rb")

    def _reap(self) -> int:
        with contextlib.suppress(BrokenPipeError):
            self.child.stdin.close()
        code = self.child.wait()
        self.done.close()
        self.child = self.done = None
        return code


def _serve(done_fd: int) -> None:
    """A Worker's child: run each request named on the control pipe (stdin), then say so on `done_fd`.
    The calls themselves see /dev/null as stdin, as `call`'s child does."""
    control = os.fdopen(os.dup(0), "r")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    with os.fdopen(done_fd, "wb") as done:
        while (request := control.readline()) and (reply := control.readline()):
            _run_request(Path(request.strip()), Path(reply.strip()))
            done.write(b"done\n")
            done.flush()


def _child_environment() -> dict[str, str]:
    path = [str(_SCRIPTS_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _unpack(reply: tuple):
    kind, value = reply
    if kind == "result":
        return value
    cause = ChildTraceback(value["traceback"])
    if value["pipeline_error"]:
        error_type, what, where, fix = value["pipeline_error"]
        raise error_type(what, where=where, fix=fix) from cause
    if value["pickled"] is not None:
        try:
            exc = pickle.loads(value["pickled"])
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            raise exc from cause
    raise IsolatedError(value["summary"]) from cause


def _run_request(request: Path, reply: Path) -> None:
    """The child's side: call the function, write back ("result", value) or ("error", description)."""
    sys_path, pickled_call = pickle.loads(request.read_bytes())
    sys.path[:] = sys_path
    try:
        function, args = pickle.loads(pickled_call)
        answer = pickle.dumps(("result", function(*args)))
    except BaseException as exc:  # everything goes back to the parent, KeyboardInterrupt and SystemExit too
        answer = pickle.dumps(("error", _describe(exc)))
    reply.write_bytes(answer)


def _describe(exc: BaseException) -> dict:
    pipeline_error = None
    if isinstance(exc, PipelineError):
        pipeline_error = (type(exc), exc.what, exc.where, exc.fix)
    try:
        pickled = pickle.dumps(exc)
    except Exception:
        pickled = None
    return {
        "pipeline_error": pipeline_error,
        "pickled": pickled,
        "summary": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc)),
    }


if __name__ == "__main__":
    _serve(int(sys.argv[2]))
