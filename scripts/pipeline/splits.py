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


def removed_summary(report: dict, split: str) -> str:
    """What prepare removed from a split, from data_report.json: "600 went in (3 duplicate, 2 longer than
    data.max_seq_length (1024 tokens))" — the answer to "why is this split so small"."""
    stats = report["splits"][split]
    too_long = stats["too_long"]
    decontaminated = report["contamination"]["train_records_removed"] if split == "train" else 0
    removed = {
        "empty": stats["empty_removed"],
        "duplicate": sum(stats["duplicates_removed"].values()),
        f"longer than data.max_seq_length ({too_long['limit']} tokens)": (
            too_long["records"] if too_long["policy"] == "drop" else 0
        ),
        "also in valid/test (decontaminate)": decontaminated,
    }
    why = ", ".join(f"{count} {reason}" for reason, count in removed.items() if count) or "none removed"
    return f"{stats['records_in']} went in ({why})"
