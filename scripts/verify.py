"""verify: check a frozen bundle (`make verify BUNDLE=dist/<experiment>-<hash>.tar.gz`) without extracting it.

Every SHA256SUMS line, the run manifest's schema and version, the requirements lock against the one the
manifest records, each recorded output the bundle holds against its recorded sha256, and the files every
bundle holds (pipeline.frozen). Prints one line per problem, naming the file, and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pipeline  # noqa: F401
from pipeline import cli, frozen
from pipeline.errors import PipelineError
from pipeline.log import setup_logging

log = logging.getLogger("verify")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.tool_parser("verify", __doc__)
    parser.add_argument("bundle", nargs="?", help="the .tar.gz that make freeze wrote")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        path = frozen.existing_bundle(args.bundle, "verify")
        record, problems = frozen.verify(path)
    except PipelineError as exc:
        log.error("error: %s", exc.line())
        return 2
    for problem in problems:
        log.error("FAIL %s", problem)
    if problems:
        log.error("error: %s", frozen.describe(problems, path).line())
        return 1
    log.info("OK %s: experiment %s, every file as recorded", path, record["experiment"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
