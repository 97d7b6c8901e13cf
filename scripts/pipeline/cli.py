"""What every stage's main() shares: the common arguments, config loading and one-line errors."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from pipeline import config, stages
from pipeline.errors import PipelineError
from pipeline.log import setup_logging

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

    Bad input is one line and exit 2; anything else (a bug) is one line and exit 1. The cause and the
    traceback go to the debug log (`-v`, or `make ... VERBOSE=1`)."""
    setup_logging(args.verbose)
    log = logging.getLogger(name)
    try:
        cfg = config.load_config(args.overrides, args.override)
        resolved = {s: config.section(cfg, s) for s in stages.get(name).logged_sections()}
        log.info("resolved config:\n%s", config.dump_yaml(resolved))
        run(cfg)
    except PipelineError as exc:
        log.debug("cause of the error below:", exc_info=exc)
        log.error("error: %s", exc.line())
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as exc:  # a bug, not bad input: still one line for the user, the traceback in the debug log
        log.debug("traceback:", exc_info=exc)
        log.error(
            "error: %s: %s -- fix: this is a bug in the %s stage; run it again with -v (make ... VERBOSE=1) "
            "and report the traceback",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
            name,
        )
        return 1
    return 0
