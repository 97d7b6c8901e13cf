"""What every stage's main() shares: the common arguments, config loading and one-line errors."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

from omegaconf import DictConfig

from pipeline import config
from pipeline.errors import PipelineError
from pipeline.log import setup_logging


def stage_parser(name: str, doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"scripts/{name}.py",
        description=doc.strip().splitlines()[0],
        epilog="Config: config/default.yaml < config/override.yaml (or --override FILE) < KEY=VALUE arguments.",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.learning_rate=2e-4")
    parser.add_argument("--override", metavar="FILE", help="an override YAML file instead of config/override.yaml")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def run_stage(name: str, args: argparse.Namespace, run: Callable[[DictConfig], None], sections: Sequence[str]) -> int:
    """Load the config, log the sections this stage reads, run it; bad input → one line, exit 2."""
    setup_logging(args.verbose)
    log = logging.getLogger(name)
    try:
        cfg = config.load_config(args.overrides, args.override)
        resolved = {s: config.section(cfg, s) for s in sections}
        log.info("resolved config:\n%s", config.dump_yaml(resolved))
        run(cfg)
    except PipelineError as exc:
        log.error("error: %s", exc.line())
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    return 0
