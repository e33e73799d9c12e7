"""The one duration parser: request keep_alive, settings and command-line flags."""

from __future__ import annotations

import pytest

from llmhost.durations import parse_duration


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90", 90),
        ("30s", 30),
        ("5m", 300),
        ("2h", 7200),
        ("1d", 86400),
        ("2w", 1209600),
        ("500ms", 0.5),
        ("1.5h", 5400),
        (7, 7),
        (2.5, 2.5),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad", ["", "5x", "-5m", "m", " 5m", "5M", "5sm", "1e9", "1.m", "12345678s", "٥m", True]
)
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_a_flag_may_require_a_unit():
    assert parse_duration("90d", unit_required=True) == 90 * 86400
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("90", unit_required=True)
