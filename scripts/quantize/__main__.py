"""`python -m quantize` (with PYTHONPATH=scripts, as `make quantize` runs it) or `python scripts/quantize`."""

import sys
from pathlib import Path

if not __package__:  # run as a path: put scripts/ on the path so that the package imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize import main  # noqa: E402

sys.exit(main())
