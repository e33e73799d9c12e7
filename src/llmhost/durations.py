"""Durations as people write them ("90", "30s", "5m", "1.5h", "7d", "2w", "500ms"): one parser
for request fields, settings and command-line flags alike."""

from __future__ import annotations

import re

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
# ASCII digits only (\d takes any script's), and few of them: no input makes a huge number
_DURATION = re.compile(r"([0-9]{1,7}(?:\.[0-9]{1,6})?)(ms|[smhdw])?")


def parse_duration(value: str | float | int, *, unit_required: bool = False) -> float:
    """Seconds from a number, or a string of digits (a fraction allowed) with an optional unit:
    ms, s, m, h, d or w; no unit means seconds. With `unit_required` a bare number in a string
    is refused (a flag like `--older-than 90` could mean days). ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 5m")
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.fullmatch(value)
    if m is None or (unit_required and m.group(2) is None):
        raise ValueError(f"not a duration: {value!r:.40} (use e.g. 30s, 5m, 2h, 7d, 2w)")
    return float(m.group(1)) * UNITS[m.group(2) or "s"]
