"""What every stage's main() shares: the common arguments, config loading and one-line errors."""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from pipeline import config, contracts, credentials, distributed, paths, stages
from pipeline.errors import PipelineError
from pipeline.log import setup_logging

import orjson
from omegaconf import DictConfig


def stage_parser(name: str, doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {name}",
        description=doc.strip().splitlines()[0],
        epilog="Config: config/default.yaml < config/override.yaml (or --override FILE) < KEY=VALUE arguments.",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.learning_rate=2e-4"
    )
    parser.add_argument("--override", metavar="FILE", help="an override YAML file instead of config/override.yaml")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, with the cause of an error")
    return parser


def run_stage(name: str, args: argparse.Namespace, run: Callable[[DictConfig], object]) -> int:
    """Load the config, log the sections this stage reads (from the stage registry), run it.

    Bad input (and a disk that refuses a write) is one line and exit 2. Anything else is a bug: one line
    and exit 1, the traceback written to <the stage's folder>/logs/<stage>-error.log (and shown with -v)."""
    setup_logging(args.verbose)
    log = logging.getLogger(name)
    cfg = None
    try:
        workspace = config.load_workspace(args.overrides, args.override)
        experiment = workspace.selected(shared=not stages.get(name).per_experiment)
        cfg = workspace.config(experiment)
        paths.use_variant(*workspace.variant(experiment))  # the base model and prepared data it uses
        if failed_upstream := upstream_failure(name, cfg):
            log.error("skipped: %s", failed_upstream)
            return 2
        if not distributed.launched():  # a rank's config is the one its launcher logged
            resolved = {s: config.section(cfg, s) for s in stages.get(name).logged_sections()}
            log.info("resolved config:\n%s", config.dump_yaml(resolved))
        run(cfg)
    except PipelineError as exc:
        log.debug("cause of the error below:", exc_info=exc)
        log.error("error: %s", exc.line())
        return _failed(name, cfg, exc.line(), 2)
    except OSError as exc:
        if exc.errno not in _DISK_ERRORS:
            return _failed(name, cfg, _report_bug(name, cfg, exc, log), 1)
        log.debug("cause of the error below:", exc_info=exc)
        log.error("error: %s", _disk_error(exc, name, cfg).line())
        return _failed(name, cfg, _disk_error(exc, name, cfg).line(), 2)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as exc:  # a bug, not bad input: still one line for the user
        return _failed(name, cfg, _report_bug(name, cfg, exc, log), 1)
    _error_log(name, cfg).unlink(missing_ok=True)  # an old bug report no longer describes this stage's outputs
    failure_record(name, cfg).unlink(missing_ok=True)
    return 0


def failure_record(name: str, cfg) -> Path:
    """<the stage's folder>/logs/<stage>.failed.json: why the stage last failed, until it next succeeds
    (the summary of `make all` reads it)."""
    return _stage_folder(name, cfg) / "logs" / f"{name}.failed.json"


def first_failure(cfg, stage_names) -> dict | None:
    """The first of `stage_names` whose failure record stands for this experiment ({"stage", "error"})."""
    for stage_name in stage_names:
        record = failure_record(stage_name, cfg)
        if record.is_file():
            try:
                return orjson.loads(record.read_bytes())
            except (OSError, ValueError):
                return {"stage": stage_name, "error": f"see {paths.display(record)}"}
    return None


def tool_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a command that is not a config-reading stage (verify, thaw, repro)."""
    parser = argparse.ArgumentParser(prog=f"python -m {name}", description=doc.strip().splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def keep_going() -> bool:
    """`make all` runs past a failed experiment (it sets PIPELINE_KEEP_GOING): a failure is then recorded
    for the summary, and the experiment's later stages skip. Any other run leaves nothing behind."""
    return os.environ.get("PIPELINE_KEEP_GOING") == "1"


def _failed(name: str, cfg, reason: str, code: int) -> int:
    if cfg is None or not keep_going():  # a wrong config has no experiment to blame
        return code
    record = {"stage": name, "error": credentials.redact(reason), "at": dt.datetime.now().isoformat(timespec="seconds")}
    try:
        contracts.write_bytes_atomic(failure_record(name, cfg), orjson.dumps(record, option=orjson.OPT_INDENT_2))
    except OSError:
        pass  # the disk refuses: the error line above is all there is
    return code


def upstream_failure(name: str, cfg) -> str | None:
    """Why an earlier stage of the same experiment failed and has not succeeded since, if it did: the
    stage would only fail on the missing input (`make all` goes on past a failed experiment)."""
    stage = stages.get(name)
    if not stage.per_experiment or not keep_going():
        return None
    for upstream in stage.upstream:
        record = failure_record(upstream, cfg)
        if record.is_file():
            try:
                return f"{upstream} failed: {orjson.loads(record.read_bytes())['error']}"
            except (OSError, ValueError, KeyError):
                return f"{upstream} failed (see {paths.display(record)})"
    return None


_DISK_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _disk_error(exc: OSError, name: str, cfg) -> PipelineError:
    where = exc.filename or _stage_folder(name, cfg)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space there and run it again; the previous outputs are unchanged"
    else:
        fix = "make the folder writable (or run from a copy you can write to); the previous outputs are unchanged"
    return PipelineError(f"cannot write: {exc.strerror}", where=paths.display(where), fix=fix)


def _report_bug(name: str, cfg, exc: BaseException, log: logging.Logger) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    saved = _error_log(name, cfg)
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(
            credentials.redact(
                f"{dt.datetime.now().isoformat(timespec='seconds')} {name} {' '.join(sys.argv[1:])}\n"
                + "".join(traceback.format_exception(exc))
            )
        )
        where = f"the traceback is in {paths.display(saved)}"
    except OSError:
        where = "run it again with -v (make ... VERBOSE=1) for the traceback"
    log.debug("traceback:", exc_info=exc)
    line = (
        f"{type(exc).__name__}: {first} -- fix: this is a bug in the {name} stage, not in your input: {where}; "
        "please report it with that file"
    )
    log.error("error: %s", line)
    return line


def _stage_folder(name: str, cfg) -> Path:
    stage = stages.get(name)
    if stage.manifest is None or (stage.per_experiment and cfg is None):
        return paths.STATE_DIR
    return stage.manifest_path(cfg.experiment.name if cfg is not None else None).parent


def _error_log(name: str, cfg) -> Path:
    return _stage_folder(name, cfg) / "logs" / f"{name}-error.log"
