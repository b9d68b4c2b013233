"""Personal data → typed placeholders: emails, phone numbers, SSNs, medical record numbers, card
numbers, dates of birth and street addresses.

    >>> redact("Call 212-555-0187, DOB 03/14/1985").text
    'Call [PHONE], DOB [DOB]'

Hand-written regular expressions rather than Presidio: Presidio's recognisers need a spaCy model
(not installable offline here) and cost milliseconds per message; these patterns cost
microseconds, and `guardrails/eval/prompts.jsonl` measures their recall. Card numbers must pass
the Luhn check; dates are redacted only after a birth cue (DOB, born, date of birth) because other
dates in a medical question (onset, visit) carry meaning; medical record numbers only after an
MRN / record-number cue; addresses are a house number, capitalised street words and a street
suffix (lower-case ones only after "address", "live at", "moved to").

Streaming: `StreamRedactor` emits redacted text as deltas arrive and holds back only a tail that
could still be part of an item (a trailing number run, the last word, an address or date in
progress), so the concatenated stream equals `redact()` of the whole text.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

PII_TYPES = ("EMAIL", "CARD", "SSN", "PHONE", "MRN", "DOB", "ADDRESS")

_MONTHS = r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
_DATE = (
    r"(?:\d{1,2}[/.\-]\d{1,2}[/.\-](?:\d{4}|\d{2})"  # 03/14/1985, 14.03.85
    r"|\d{4}[/.\-]\d{1,2}[/.\-]\d{1,2}"  # 1985-03-14
    rf"|{_MONTHS}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}"  # March 14, 1985
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTHS}\.?,?\s+\d{{4}})"  # 14th of March 1985
)
_DOB_CUE = r"(?:\bdob\b|\bd\.o\.b\.?|\bdate\s+of\s+birth\b|\bbirth\s*date\b|\bbirthday\b|\bborn\b(?:\s+(?:on|in))?)"
_STREET = (
    r"(?:street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|ter"
    r"|circle|cir|highway|hwy|parkway|pkwy|square|sq|close|crescent|row|alley|trail)"
)
_UNIT = r"(?:,?\s+(?i:apt|apartment|suite|ste|unit|flat)\.?\s*#?\s*[A-Za-z0-9-]{1,6}|,?\s+#\s*\d{1,5}[A-Za-z]?)?"
_DIRECTION = r"(?:\s+(?:N|S|E|W|NE|NW|SE|SW)\b)?"

_PATTERNS: dict[str, re.Pattern] = {
    "EMAIL": re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}"),
    # 13-19 digits in groups; validated with Luhn below.
    "CARD": re.compile(r"(?<![\d\w])\d(?:[ -]?\d){12,18}(?![\d\w])"),
    "SSN": re.compile(
        r"(?<![\d\w-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d\w-])"
        r"|(?i:(?<=ssn)|(?<=social security number)|(?<=social security no))[:#]?\s*(?P<value>(?!000|666|9\d\d)\d{9})(?!\d)"
    ),
    "PHONE": re.compile(
        r"(?<![\w+/.-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w/-])"  # (415) 555-0132, 212-555-0187
        r"|(?<![\w+/.-])\+\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){2,5}(?![\w/-])"  # +44 20 7946 0958
        r"|(?i:(?<=phone)|(?<=tel)|(?<=call)|(?<=text)|(?<=mobile)|(?<=cell))(?:\s+(?:me|us|at|on|is))*[:.]?\s*(?P<value>\d{10})(?!\d)"
    ),
    "MRN": re.compile(
        r"(?i:\bmrn\b|\bmedical\s+record\s+(?:number|no\.?|#)|\bmed\.?\s*rec\.?\s*(?:no\.?|#)|\bpatient\s+id\b|\bchart\s+(?:number|no\.?|#))"
        r"\s*(?:is\s+)?[:#]?\s*#?\s*(?P<value>[A-Za-z]{0,3}-?\d[\d-]{3,14}\d)(?![\w])"
    ),
    "DOB": re.compile(rf"(?i:{_DOB_CUE}\s*(?:is|was|of)?\s*[:,\-]?\s*\(?\s*)(?P<value>(?i:{_DATE}))"),
    "ADDRESS": re.compile(
        rf"(?<![\w/.-])\d{{1,6}}[A-Za-z]?\s+(?:[A-Z][A-Za-z'.-]*\s+){{1,4}}(?i:{_STREET})\b\.?{_DIRECTION}{_UNIT}"
        rf"|(?i:(?<=address)|(?<=address is)|(?<=live at)|(?<=lives at)|(?<=living at)|(?<=moved to)|(?<=reside at))[:\s]+"
        rf"(?P<value>\d{{1,6}}[A-Za-z]?\s+(?:[A-Za-z'.-]+\s+){{0,4}}(?i:{_STREET})\b\.?{_DIRECTION}{_UNIT})"
    ),
}


def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    type: str


def find_pii(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> list[Span]:
    """Non-overlapping PII spans, earlier types in PII_TYPES winning overlaps (a card number is
    not also a phone number)."""
    spans: list[Span] = []
    taken: list[tuple[int, int]] = []
    for kind in PII_TYPES:
        if kind not in types:
            continue
        for m in _PATTERNS[kind].finditer(text):
            start, end = (m.start("value"), m.end("value")) if "value" in m.groupdict() and m.group("value") else m.span()
            value = text[start:end]
            if kind == "CARD" and not luhn_ok(value):
                continue
            if kind == "PHONE" and not 7 <= sum(c.isdigit() for c in value) <= 15:
                continue
            if any(start < e and s < end for s, e in taken):
                continue
            spans.append(Span(start, end, kind))
            taken.append((start, end))
    spans.sort(key=lambda s: s.start)
    return spans


@dataclass
class Redaction:
    text: str
    counts: Counter = field(default_factory=Counter)

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(sorted(self.counts))


def apply_spans(text: str, spans: list[Span], offset: int = 0) -> str:
    """Replace each span of `text` by its placeholder; span positions are `offset` + index in `text`."""
    out, pos = [], 0
    for s in spans:
        a, b = s.start - offset, s.end - offset
        out.append(text[pos:a])
        out.append(f"[{s.type}]")
        pos = b
    out.append(text[pos:])
    return "".join(out)


def redact(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> Redaction:
    spans = find_pii(text, types)
    return Redaction(apply_spans(text, spans), Counter(s.type for s in spans))


# For the classifier, placeholders are dropped: an embedding model has never seen "[DOB]", reads
# bracketed tokens as markup (the shape of "[ADMIN]" overrides), and a message full of personal
# details looks like a request *for* personal details. (Measured on the PII prompts of the eval
# set: 2 of 24 false blocks with placeholders dropped, 6 with realistic stand-in values.)
_PLACEHOLDER = re.compile(r"\s*\[(?:" + "|".join(PII_TYPES) + r")\]")


def strip_placeholders(text: str) -> str:
    return _PLACEHOLDER.sub("", text)


# What could still grow into an item at the end of the text seen so far.
_TAIL_WORD = re.compile(r"\S+$")
_TAIL_NUMBER = re.compile(r"[+(]?\d[\d\s().\-/]*$")
_TAIL_ADDRESS = re.compile(r"(?<![\w])\d{1,6}[A-Za-z]?(?:\s+[A-Za-z'.,#-]+){0,6}\s*$")
_TAIL_CUE = re.compile(rf"(?:{_DOB_CUE}|\bmrn\b|\brecord\s+(?:number|no\.?)|\bpatient\s+id\b|\bssn\b|\bphone\b)(?P<after>[^.\n]{{0,24}})$", re.I)
_TAIL_MONTH = re.compile(rf"(?i:\b{_MONTHS}\.?(?:\s+\d{{0,2}}(?:st|nd|rd|th)?)?,?\s*\d{{0,4}})$")


class StreamRedactor:
    """Redacts a text that arrives in pieces. `push(delta)` returns the redacted text that can be
    shown now; `flush()` returns the rest. The concatenation equals `redact(whole).text`."""

    CONTEXT = 96  # raw characters before the emitted boundary that cues (DOB, MRN) may need

    def __init__(self, types: tuple[str, ...] | list[str] = PII_TYPES):
        self.types = tuple(types)
        self.raw = ""
        self.emitted = 0  # raw characters already passed through
        self.counts: Counter = Counter()

    def _hold_from(self, spans: list[Span]) -> int:
        raw, n = self.raw, len(self.raw)
        window = raw[max(self.emitted, n - 160):]
        woff = n - len(window)
        cut = n
        # the last word may be half an email or a number; numbers, addresses, dates and the text
        # after a DOB / MRN cue may still grow into an item
        for pattern in (_TAIL_WORD, _TAIL_NUMBER, _TAIL_ADDRESS, _TAIL_MONTH):
            m = pattern.search(window)
            if m:
                cut = min(cut, woff + m.start())
        # a cue may already have been shown: look for it in the raw context, hold what follows it
        ctx_off = max(0, n - 160)
        m = _TAIL_CUE.search(raw, ctx_off)
        if m:
            cut = min(cut, m.start("after"))
        for s in spans:
            # an item that ends near the end may still grow (an apartment number, more digits)
            if s.end >= n - 12 or s.start < cut < s.end:
                cut = min(cut, s.start)
        return max(cut, self.emitted)

    def _emit(self, upto: int, spans: list[Span]) -> str:
        start = self.emitted
        if upto <= start:
            return ""
        inside = []
        for s in spans:
            if s.end <= start or s.start >= upto:
                continue
            # an item that straddles the emitted boundary: its visible prefix is gone, replace the rest
            inside.append(Span(max(s.start, start), min(s.end, upto), s.type))
            self.counts[s.type] += 1
        out = apply_spans(self.raw[start:upto], inside, offset=start)
        self.emitted = upto
        return out

    def _spans(self) -> list[Span]:
        base = max(0, self.emitted - self.CONTEXT)
        return [Span(s.start + base, s.end + base, s.type) for s in find_pii(self.raw[base:], self.types)]

    def push(self, delta: str) -> str:
        self.raw += delta
        spans = self._spans()
        return self._emit(self._hold_from(spans), spans)

    def flush(self) -> str:
        return self._emit(len(self.raw), self._spans())

    @property
    def pending(self) -> int:
        return len(self.raw) - self.emitted
