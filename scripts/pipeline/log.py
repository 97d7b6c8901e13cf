"""Logging to stderr in one fixed format, and progress: a bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

_FORMAT = "%(asctime)s [%(name)s] %(message)s"


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "pipeline_handler", False)]:
        root.removeHandler(old)
    if interactive():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_level=False, log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.pipeline_handler = True
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def interactive() -> bool:
    """A person watching a terminal (not CI, not a log file)."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress(items: Iterable, total: int | None, description: str, logger: logging.Logger, every_seconds: float = 10.0) -> Iterator:
    """Iterate with a progress bar on a terminal, or a plain log line every few seconds elsewhere."""
    if interactive():
        from rich.progress import track

        yield from track(items, total=total, description=description, transient=True)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_seconds:
            last = now
            of_total = f"/{total}" if total else ""
            logger.info("%s %d%s (%.0f s)", description, done, of_total, now - start)
