"""Field-level redaction for audit records and application logs: each match of a sensitive
pattern is replaced by a typed placeholder (`[EMAIL]`, `[ID_CN]`, …). Numbers are only taken
for identifiers when their check digits agree (PRC resident ID: ISO 7064 MOD 11-2 and a real
birth date; bank cards: Luhn and a card-network prefix), so ordinary numbers pass through."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def valid_cn_id(text: str) -> bool:
    """An 18-character PRC resident identity number with a real birth date and check digit."""
    if len(text) != 18 or not text[:17].isdigit():
        return False
    try:
        born = date(int(text[6:10]), int(text[10:12]), int(text[12:14]))
    except ValueError:
        return False
    if not date(1900, 1, 1) <= born <= date.today():
        return False
    total = sum(int(d) * w for d, w in zip(text[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == text[17].upper()


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|35|6(?:011|2|4[4-9]|5))")


def valid_card(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn_ok(digits)


@dataclass(frozen=True)
class Rule:
    label: str
    pattern: re.Pattern[str]
    check: Callable[[str], bool] | None = None
    groups: tuple[int, ...] = (0,)  # the first of these that matched is replaced

    def apply(self, text: str) -> tuple[str, int]:
        hits = 0

        def sub(m: re.Match[str]) -> str:
            nonlocal hits
            group = next(g for g in self.groups if m.group(g) is not None)
            value = m.group(group)
            if self.check is not None and not self.check(value):
                return m.group(0)
            hits += 1
            if group == 0:
                return f"[{self.label}]"
            start, end = m.span(group)
            whole = m.group(0)
            offset = m.start(0)
            return whole[: start - offset] + f"[{self.label}]" + whole[end - offset :]

        return self.pattern.sub(sub, text), hits


_D = r"(?<![\w.+-])"  # not glued to a word, a number or an address before it
BUILTIN_RULES: tuple[Rule, ...] = (
    Rule("JWT", re.compile(r"\beyJ[\w-]{6,}\.eyJ[\w-]{6,}\.[\w-]*")),
    Rule(
        "API_KEY",
        re.compile(
            r"\b(?:sk-(?:proj-)?[A-Za-z0-9_-]{16,}|llmh_[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}"
            r"|gh[pousr]_[A-Za-z0-9]{30,}|hf_[A-Za-z0-9]{30,}|xox[baprs]-[A-Za-z0-9-]{10,})"
        ),
    ),
    Rule("API_KEY", re.compile(r"(?i)\bBearer\s+([A-Za-z0-9._~+/-]{16,}=*)"), groups=(1,)),
    Rule(
        "PASSWORD",
        re.compile(
            r"(?i)\b(?:password|passwd|pwd|passphrase|secret|client_secret|api[_-]?key|token"
            r"|密码)[\"']?\s*[:=：]\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s,;&\"']+))"
        ),
        groups=(1, 2, 3),
    ),
    Rule(
        "EMAIL",
        re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    ),
    Rule("ID_CN", re.compile(r"(?<![\dA-Za-z])\d{17}[\dXx](?![\dA-Za-z])"), valid_cn_id),
    Rule(
        "BANK_CARD",
        re.compile(r"(?<![\d-])\d{4}(?:[ -]?\d{4}){2}[ -]?\d{1,7}(?![\d-])"),
        valid_card,
    ),
    Rule("PHONE", re.compile(rf"{_D}(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{{4}}){{2}}(?!\d)")),
    Rule(
        "PHONE",
        re.compile(
            rf"{_D}\+[1-9]\d{{0,2}}[ -]?(?:\(\d{{1,4}}\)[ -]?)?"
            r"\d{2,4}(?:[ -]?\d{2,4}){1,4}(?!\d)"
        ),
    ),
)
IP_RULES: tuple[Rule, ...] = (
    Rule(
        "IP",
        re.compile(
            r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])"
        ),
    ),
    Rule(
        "IP",
        re.compile(
            r"(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![:\w])"
            r"|(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){1,7}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?(?![:\w])"
        ),
    ),
)


@dataclass
class Redactor:
    """Applies the built-in rules (plus IP addresses when asked, plus `extra` label→regex)."""

    ip: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)
    rules: tuple[Rule, ...] = field(init=False)

    def __post_init__(self) -> None:
        extra = tuple(Rule(label.upper(), re.compile(p)) for label, p in self.extra.items())
        self.rules = extra + BUILTIN_RULES + (IP_RULES if self.ip else ())

    def redact(self, text: str) -> str:
        return self.redact_counted(text)[0]

    def redact_counted(self, text: str) -> tuple[str, dict[str, int]]:
        counts: dict[str, int] = {}
        for rule in self.rules:
            text, hits = rule.apply(text)
            if hits:
                counts[rule.label] = counts.get(rule.label, 0) + hits
        return text, counts
