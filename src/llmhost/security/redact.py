"""Field-level redaction for audit records and application logs: each match of a sensitive
pattern is replaced by a typed placeholder (`[EMAIL]`, `[ID_CN]`, …). Numbers are only taken
for identifiers when their check digits agree (PRC resident ID: ISO 7064 MOD 11-2 and a real
birth date; bank cards: Luhn and a card-network prefix), so ordinary numbers pass through.

Every built-in pattern runs in time linear in the text. Python's `re` backtracks, so each
pattern is written so that no character is scanned more than a bounded number of times:
a match may only start where the run of characters its first repetition consumes starts
(a look-behind excludes every position inside such a run), repetitions are possessive
(`++`, `*+`: never given back) or bounded, and alternatives cannot overlap. The tests hold
each pattern to this on adversarial inputs. `redact(text, limit=N)` also stops the work at
the first N characters of the text, whatever its size, and redacts a match that straddles
the cut whole."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
# How far past a cut the text is still read, so that a match that starts before the cut is
# seen whole (the longest bounded pattern is far shorter; the run-consuming ones match a
# cut-off run just as well).
_LOOKAHEAD = 1024


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
    digits = text.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn_ok(digits)


@dataclass(frozen=True)
class Rule:
    label: str
    pattern: re.Pattern[str]
    check: Callable[[str], bool] | None = None
    groups: tuple[int, ...] = (0,)  # the first of these that matched is replaced

    def _replacement(self, m: re.Match[str]) -> str | None:
        group = next(g for g in self.groups if m.group(g) is not None)
        value = m.group(group)
        if self.check is not None and not self.check(value):
            return None
        if group == 0:
            return f"[{self.label}]"
        start, end = m.span(group)
        offset = m.start(0)
        whole = m.group(0)
        return whole[: start - offset] + f"[{self.label}]" + whole[end - offset :]

    def apply(self, text: str, cut: int | None = None) -> tuple[str, int, int]:
        """Replace every match; returns the new text, the number of replacements and where
        `cut` (a position in `text`, default its end) lies in the new text. A match that
        starts before the cut and ends after it moves the cut past its placeholder."""
        cut = len(text) if cut is None else cut
        out: list[str] = []
        pos = olen = hits = 0
        new_cut: int | None = None
        for m in self.pattern.finditer(text):
            rep = self._replacement(m)
            if rep is None:
                continue
            start, end = m.span()
            if new_cut is None and start >= cut:
                new_cut = olen + (cut - pos)
            out.append(text[pos:start])
            olen += start - pos
            if new_cut is None and end > cut:
                new_cut = olen + len(rep)
            out.append(rep)
            olen += len(rep)
            pos = end
            hits += 1
        if not hits:
            return text, 0, cut
        if new_cut is None:
            new_cut = olen + (cut - pos)
        out.append(text[pos:])
        return "".join(out), hits, new_cut


# Not glued to a word, a number or an address before it: also keeps a number pattern from
# starting again inside a run of digits it already failed on.
_D = r"(?<![\w.+-])"
_LOCAL = r"A-Za-z0-9._%+-"  # an e-mail address's local part
BUILTIN_RULES: tuple[Rule, ...] = (
    Rule("JWT", re.compile(r"(?<![\w-])eyJ[\w-]{6,}+\.eyJ[\w-]{6,}+\.[\w-]*+")),
    Rule(
        "API_KEY",
        re.compile(
            r"(?<![\w-])(?:sk-(?:proj-)?[A-Za-z0-9_-]{16,}+|llmh_[A-Za-z0-9_-]{16,}+"
            r"|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}+|hf_[A-Za-z0-9]{30,}+"
            r"|xox[baprs]-[A-Za-z0-9-]{10,}+)"
        ),
    ),
    Rule("API_KEY", re.compile(r"(?i)\bBearer\s++([A-Za-z0-9._~+/-]{16,}+=*+)"), groups=(1,)),
    Rule(
        "PASSWORD",
        re.compile(
            r"(?i)\b(?:password|passwd|pwd|passphrase|secret|client_secret|api[_-]?key|token"
            r"|密码)[\"']?[ \t]{0,16}+[:=：][ \t]{0,16}+"
            r"(?:\"([^\"\n]{0,512}+)\"|'([^'\n]{0,512}+)'|([^\s,;&\"']++))"
        ),
        groups=(1, 2, 3),
    ),
    Rule(
        "EMAIL",
        # The local part starts where a run of its characters starts and is taken whole; the
        # domain's labels (each followed by a dot) are taken whole, then the top-level label.
        re.compile(
            rf"(?<![{_LOCAL}])[{_LOCAL}]++@(?:[A-Za-z0-9-]++\.)++[A-Za-z]{{2,}}+(?![A-Za-z0-9_])"
        ),
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
    Rule(
        "PHONE",
        # North American numbers written without a country code: (415) 555-2671,
        # 415-555-2671, 415.555.2671, 1-415-555-2671. Area code and exchange start with 2-9;
        # a separator is required, so plain ten-digit numbers (ids, timestamps) pass.
        re.compile(
            r"(?<![\w.+-])(?:1[ .-])?(?:\([2-9]\d\d\)[ ]?|[2-9]\d\d[ .-])[2-9]\d\d[ .-]\d{4}"
            r"(?![\w-]|\.\d)"
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


@dataclass(frozen=True)
class Redacted:
    text: str
    counts: dict[str, int]
    truncated: int = 0  # characters of the input past the limit, left out


@dataclass
class Redactor:
    """Applies the built-in rules (plus IP addresses when asked, plus `extra` label→regex;
    extra patterns are the caller's, and linear only if written so)."""

    ip: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)
    rules: tuple[Rule, ...] = field(init=False)

    def __post_init__(self) -> None:
        extra = tuple(Rule(label.upper(), re.compile(p)) for label, p in self.extra.items())
        self.rules = extra + BUILTIN_RULES + (IP_RULES if self.ip else ())

    def redact(self, text: str, limit: int | None = None) -> str:
        return self.run(text, limit).text

    def redact_counted(self, text: str) -> tuple[str, dict[str, int]]:
        done = self.run(text)
        return done.text, done.counts

    def run(self, text: str, limit: int | None = None) -> Redacted:
        """Redact `text`, or only its first `limit` characters (the rest is dropped and its
        length reported), in time linear in min(len(text), limit)."""
        counts: dict[str, int] = {}
        dropped = 0
        cut: int | None = None
        if limit is not None and len(text) > limit:
            dropped = len(text) - limit
            text, cut = text[: limit + _LOOKAHEAD], limit
        for rule in self.rules:
            text, hits, new_cut = rule.apply(text, cut)
            if cut is not None:
                cut = new_cut
            if hits:
                counts[rule.label] = counts.get(rule.label, 0) + hits
        if cut is not None:
            text = text[:cut]
        return Redacted(text, counts, dropped)
