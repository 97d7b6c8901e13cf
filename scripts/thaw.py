"""thaw: extract a frozen bundle safely (`make thaw BUNDLE=<file> DEST=<dir>`), after verifying it.

Nothing is extracted unless the bundle verifies (pipeline.frozen) and every member is safe to write
(pipeline.bundle: no absolute paths, `..`, links leaving DEST, devices, FIFOs, duplicates, oversize
members); then the members are written into DEST through tarfile's "data" filter. A refused bundle is
one line naming the member, exit 2, and DEST as it was.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pipeline  # noqa: F401
from pipeline import bundle, cli, frozen
from pipeline.errors import PipelineError
from pipeline.log import setup_logging

log = logging.getLogger("thaw")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.tool_parser("thaw", __doc__)
    parser.add_argument("bundle", nargs="?", help="the .tar.gz that make freeze wrote")
    parser.add_argument("dest", nargs="?", help="the folder to extract into (created; must not hold its files)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        path = frozen.existing_bundle(args.bundle, "thaw")
        if not args.dest:
            raise PipelineError("no destination given", where="DEST", fix=f"make thaw BUNDLE={path} DEST=<folder>")
        record, problems = frozen.verify(path)
        if problems:
            raise frozen.describe(problems, path)
        dest = bundle.thaw(path, Path(args.dest).expanduser())
    except PipelineError as exc:
        log.error("error: %s", exc.line())
        return 2
    log.info("thawed %s into %s (experiment %s, verified)", path, dest, record["experiment"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
