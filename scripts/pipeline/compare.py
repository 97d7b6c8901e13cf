"""Comparing what two engines or renderings produced."""

from __future__ import annotations

from collections.abc import Sequence


def first_difference(a: Sequence, b: Sequence) -> int:
    """The first position where two sequences (token ids, texts) differ; the shorter length if one is a
    prefix of the other."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
