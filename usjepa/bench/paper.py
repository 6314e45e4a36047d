"""Published linear-probe results of Radhachandran et al., US-JEPA (2026), arXiv:2602.19322:
test macro-F1 (%), mean of 5 seeds, on the eight UltraBench datasets (docs/method.md#bench-protocols)."""

from __future__ import annotations

import re

# model -> dataset (our shard recipe names) -> macro-F1 (%), as published.
PAPER_MACRO_F1: dict[str, dict[str, float]] = {
    "DINOv3": {
        "aul": 64.3,
        "busbra": 70.9,
        "butterfly": 91.7,
        "fatty_liver": 55.8,
        "gbcu": 61.7,
        "mmotu": 37.2,
        "pocus": 91.4,
        "tn5000": 67.5,
    },
    "I-JEPA": {
        "aul": 61.5,
        "busbra": 71.2,
        "butterfly": 90.5,
        "fatty_liver": 54.8,
        "gbcu": 53.7,
        "mmotu": 35.3,
        "pocus": 88.1,
        "tn5000": 68.9,
    },
    "USFM": {
        "aul": 61.6,
        "busbra": 74.6,
        "butterfly": 92.4,
        "fatty_liver": 73.6,
        "gbcu": 67.4,
        "mmotu": 33.8,
        "pocus": 85.7,
        "tn5000": 65.0,
    },
    "URFM (teacher)": {
        "aul": 71.5,
        "busbra": 69.5,
        "butterfly": 92.1,
        "fatty_liver": 82.6,
        "gbcu": 59.1,
        "mmotu": 42.7,
        "pocus": 91.7,
        "tn5000": 77.4,
    },
    "US-JEPA": {
        "aul": 69.6,
        "busbra": 73.8,
        "butterfly": 90.8,
        "fatty_liver": 82.5,
        "gbcu": 67.0,
        "mmotu": 52.2,
        "pocus": 93.1,
        "tn5000": 73.1,
    },
    "USrc-JEPA": {
        "aul": 67.6,
        "busbra": 76.0,
        "butterfly": 91.5,
        "fatty_liver": 89.2,
        "gbcu": 70.2,
        "mmotu": 46.8,
        "pocus": 92.5,
        "tn5000": 70.8,
    },
}

PAPER_DATASETS: tuple[str, ...] = tuple(PAPER_MACRO_F1["US-JEPA"])

# Other spellings people give these sets, in the normalised form of _normalise.
_ALIASES = {"fatty": "fatty_liver"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_\s]", "", name).lower()


_BY_NORMALISED = {**{_normalise(d): d for d in PAPER_DATASETS}, **_ALIASES}


def paper_dataset(name: str) -> str | None:
    """The paper's dataset that the bench dataset `name` is ("Fatty-Liver", "fatty" ->
    "fatty_liver"; case, '-', '_' and spaces ignored), or None when the paper has no such set."""
    return _BY_NORMALISED.get(_normalise(name))
