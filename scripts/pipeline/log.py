"""Logging to stderr in one fixed format, and progress: a bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import logging
import os
import sys

from pipeline import credentials

from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_FORMAT = "%(asctime)s [%(name)s] %(message)s"


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "pipeline_handler", False)]:
        root.removeHandler(old)
    if interactive():
        handler: logging.Handler = RichHandler(show_path=False, show_level=False, log_time_format="%H:%M:%S")
        handler.setFormatter(_RedactingFormatter("[%(name)s] %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_RedactingFormatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.pipeline_handler = True
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _RedactingFormatter(logging.Formatter):
    """Every known secret value (pipeline.credentials) becomes *** in the line and its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        return credentials.redact(super().format(record))


def interactive() -> bool:
    """A person watching a terminal (not CI, not a log file)."""
    return sys.stderr.isatty() and not os.environ.get("CI")


class StepProgress:
    """Training progress: a live bar (step, loss, ETA) on a terminal; elsewhere the report lines alone."""

    def __init__(self, total: int, start: int, logger: logging.Logger):
        self.total, self.start, self.logger = total, start, logger
        self._progress = None

    def __enter__(self):
        if interactive():
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("tok/s {task.fields[tps]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start, loss="-", tps="-")
        return self

    def advance(self, step: int, loss: float, tokens_per_second: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=f"{loss:.3f}", tps=f"{tokens_per_second:.0f}")

    def report(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.log(line)
        else:
            self.logger.info(line)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


class ItemProgress:
    """Progress over a few long items (artifacts to score): a bar on a terminal, a line per item elsewhere."""

    def __init__(self, total: int, label: str, logger: logging.Logger):
        self.total, self.label, self.logger, self.done = total, label, logger, 0
        self._progress = None

    def __enter__(self):
        if interactive():
            self._progress = Progress(
                TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def advance(self, line: str) -> None:
        self.done += 1
        text = f"[{self.done}/{self.total}] {line}"
        if self._progress is not None:
            self._progress.console.log(text)
            self._progress.update(self._task, completed=self.done)
        else:
            self.logger.info(text)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
