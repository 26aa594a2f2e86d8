"""The label subsets every format serves alike, so `eval.train_percent` selects the same images whatever `data.format`.

The 10% and 1% subsets are fixed per class (unlabelled images: one class): the samples whose key hash (SHA-256,
53 bits) is among the `max(1, round(n * p / 100))` smallest of their class. A key is `<class>/<file stem>`.
"""

from __future__ import annotations

import hashlib

SUBSET_PERCENTS = (10, 1)  # the label-fraction protocols; 100 is every sample


def key_hash(key: str) -> int:
    """A stable 53-bit hash of a sample key (exact in JSON numbers and JavaScript alike)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 11


def subset_thresholds(hashes_by_class: list[list[int]], percent: int) -> list[int]:
    """Per class, the largest key hash inside the `percent` subset (-1: an empty class)."""
    out = []
    for hashes in hashes_by_class:
        if not hashes:
            out.append(-1)
            continue
        keep = max(1, round(len(hashes) * percent / 100))
        out.append(sorted(hashes)[keep - 1])
    return out
