"""Range checks of numeric settings, each declared as a short rule: 'integer >= 1', 'number in [0, 255]',
'number in [0, 1)', optionally followed by a note such as '(0: off)' for the message."""

from __future__ import annotations

import math
import re

_RULE = re.compile(r"(integer|number) (?:>= (\S+)|in \[(\S+), (\S+)([\])]))( \(.*\))?")


def range_problems(settings, rules: dict[str, str], prefix: str = "") -> list[str]:
    """'<prefix><field> <value> must be <rule>' for each field of `settings` that breaks its rule (a bool
    is not a number, and numbers are finite)."""
    problems = []
    for name, rule in rules.items():
        value = getattr(settings, name)
        kind, at_least, low, high, closing, _ = _RULE.fullmatch(rule).groups()
        ok = isinstance(value, int if kind == "integer" else (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        if ok and at_least is not None:
            ok = value >= float(at_least)
        elif ok:
            ok = float(low) <= value and (value <= float(high) if closing == "]" else value < float(high))
        if not ok:
            problems.append(
                f"{prefix}{name.replace('_', ' ')} {value!r} must be {'an' if kind == 'integer' else 'a'} {rule}"
            )
    return problems
