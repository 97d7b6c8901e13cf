"""The prepared splits, read through the data contract that names them."""

from __future__ import annotations

from pipeline import paths
from pipeline.errors import ContractError

import orjson


def read_split(contract: dict, split: str, limit: int = -1) -> list[dict]:
    """The records of a split (the first `limit`; -1: all); a missing file is an empty split."""
    path = paths.resolve(contract["splits"][split])
    if not path.is_file():
        return []
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if limit >= 0 and len(records) >= limit:
            break
        if not line.strip():
            continue
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise ContractError(
                f"not valid JSON ({exc})", where=f"{paths.display(path)}:{line_no}", fix="re-run `make prepare`"
            ) from exc
    return records
