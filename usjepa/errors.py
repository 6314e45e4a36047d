"""The one exception type for mistakes a user can fix, and argparse types whose mistakes argparse
reports the same way.

The CLI prints these as a single line (what, where, how to fix) instead of a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


class UserError(Exception):
    """Bad input, configuration or environment that the user can correct."""


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < low:
            need = "a positive whole number (1 or more)" if low == 1 else f"a whole number >= {low}"
            raise argparse.ArgumentTypeError(f"'{text}' must be {need}")
        return value

    return parse
