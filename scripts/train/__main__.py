"""`python -m train` (with PYTHONPATH=scripts, as `make train` runs it) or `python scripts/train`."""

import sys
from pathlib import Path

if not __package__:  # run as a path: put scripts/ on the path so that the package imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import main  # noqa: E402

sys.exit(main())
