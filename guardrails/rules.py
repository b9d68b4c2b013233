"""The fast layer: normalisation, decoding of smuggled payloads, and regular-expression rules.

Rules are written in the policy YAML as lower-case regular expressions per category; each may be
a plain pattern or `{match: ..., unless: ...}` where `unless` vetoes the hit (e.g. "forged
prescription" asked by someone who wants to *detect* one). They run on a normalised copy of the
text (Unicode NFKC, zero-width characters removed, lower case, curly quotes straightened, runs of
white space collapsed) and, when a word mixes letters with digits or symbols, on de-leeted copies
("h0w t0 c00k m3th" → "how to cook meth").

Encoded payloads are decoded and checked again like any other text: base64 runs of 16+
characters, hex byte runs, and the whole message when it mentions rot13. Decoding is best-effort:
a run that does not decode to mostly printable UTF-8 is ignored.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from dataclasses import dataclass

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\ufeff\u00ad"), None)
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"})
_LEET_I = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
_LEET_L = str.maketrans({"0": "o", "1": "l", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
_LEET_WORD = re.compile(r"\b[a-z0-9@$!]*[a-z][0-9@$!]+[a-z][a-z0-9@$!]*")  # a digit or symbol between letters
_MIXED_WORD = re.compile(r"(?<![\w@$!])(?=[\w@$!]*[a-z])(?=[\w@$!]*[0-9@$!])[\w@$!]+")  # letters mixed with digits or symbols
_SPACED = re.compile(r"\b(?:[a-z][\s.\-_*·|/+]{1,3}){3,}[a-z]\b")  # "k i l l", "s.u.i.c.i.d.e", "k - i - l - l"
_WS = re.compile(r"\s+")
# Cyrillic and Greek letters drawn like Latin ones. A word that mixes them with Latin letters ("kіll" with a
# Cyrillic і), or is made of them alone inside Latin text, is folded to Latin; real Russian or Greek words are not.
_CONFUSABLE = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ɡ": "g",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T", "Х": "X",
    "І": "I", "Ј": "J", "Ѕ": "S", "У": "Y",
    "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P",
    "Τ": "T", "Υ": "Y", "Χ": "X",
})
_GREEK_CYRILLIC = r"[\u0370-\u03ff\u0400-\u052f\u0261]"
_FOREIGN_LETTER = re.compile(_GREEK_CYRILLIC)
_WORD_WITH_FOREIGN = re.compile(rf"\w*{_GREEK_CYRILLIC}\w*")


def fold_confusables(text: str) -> str:
    """Latin look-alikes from Cyrillic and Greek folded to Latin, where they disguise Latin words (see above)."""
    if not _FOREIGN_LETTER.search(text):
        return text
    latin_text = len(re.findall(r"[A-Za-z]", text)) > len(_FOREIGN_LETTER.findall(text))

    def fold(m: re.Match) -> str:
        word = m.group(0)
        folded = word.translate(_CONFUSABLE)
        if re.search(r"[A-Za-z]", word) or (latin_text and not _FOREIGN_LETTER.search(folded)):
            return folded
        return word

    return _WORD_WITH_FOREIGN.sub(fold, text)


def normalize(text: str) -> str:
    text = fold_confusables(unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH).translate(_QUOTES)).lower()
    return _WS.sub(" ", text).strip()


def variants(text: str) -> list[str]:
    """The normalised text plus de-obfuscated copies when it looks obfuscated."""
    base = normalize(text)
    out = [base]
    if _LEET_WORD.search(base):
        for table in (_LEET_I, _LEET_L):
            # translate only words that mix letters with digits, so "take 1 tablet" keeps its number
            v = _MIXED_WORD.sub(lambda m: m.group(0).translate(table), base)
            if v not in out:
                out.append(v)
    if _SPACED.search(base):
        v = _SPACED.sub(lambda m: re.sub(r"[\s.\-_*]", "", m.group(0)), base)
        if v not in out:
            out.append(v)
    return out


def looks_obfuscated(text: str) -> bool:
    base = normalize(text)
    return bool(_LEET_WORD.search(base) or _SPACED.search(base)) or fold_confusables(text) != text


# ---- decoding -----------------------------------------------------------------------------------

_B64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[\s:]?){8,}")
_ROT13_CUE = re.compile(r"\brot[\s-]?13\b", re.I)


def _printable(s: str) -> bool:
    if len(s.strip()) < 4:
        return False
    good = sum(ch.isprintable() or ch in "\n\t" for ch in s)
    letters = sum(ch.isalpha() for ch in s)
    return good / len(s) >= 0.95 and letters / len(s) >= 0.5


@dataclass(frozen=True)
class Decoded:
    encoding: str  # base64 | hex | rot13
    span: tuple[int, int]  # where the payload sat in the text (rot13: the whole text)
    text: str


def decode_payloads(text: str, encodings: tuple[str, ...] | list[str] = ("base64", "hex", "rot13")) -> list[Decoded]:
    found: list[Decoded] = []
    if "base64" in encodings:
        for m in _B64.finditer(text):
            token = m.group(0)
            if token.isalpha() and (token.islower() or token.isupper()):
                continue  # a long plain word, not base64
            raw = token.replace("-", "+").replace("_", "/")
            raw += "=" * (-len(raw) % 4)
            try:
                s = base64.b64decode(raw, validate=True).decode("utf-8")
            except (binascii.Error, ValueError, UnicodeDecodeError):
                continue
            if _printable(s):
                found.append(Decoded("base64", m.span(), s))
    if "hex" in encodings:
        for m in _HEX.finditer(text):
            digits = re.sub(r"[\s:]", "", m.group(0))
            if digits.isdigit():
                continue  # a card, phone or record number: hex of a sentence has a-f digits (j-o, z, ".", "?")
            if len(digits) % 2:
                digits = digits[:-1]
            try:
                s = bytes.fromhex(digits).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                continue
            if _printable(s):
                found.append(Decoded("hex", m.span(), s))
    if "rot13" in encodings and _ROT13_CUE.search(text):
        found.append(Decoded("rot13", (0, len(text)), codecs.decode(text, "rot13")))
    return found


def substitute_decoded(text: str, decoded: list[Decoded]) -> str:
    """The text with each inline payload replaced by what it decodes to (what the model would read)."""
    out, pos = [], 0
    for d in sorted((d for d in decoded if d.encoding != "rot13"), key=lambda d: d.span[0]):
        if d.span[0] < pos:
            continue
        out.append(text[pos:d.span[0]])
        out.append(d.text)
        pos = d.span[1]
    out.append(text[pos:])
    return "".join(out)


# ---- rules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    category: str
    name: str  # "<category>.<index>", what the audit log and the reason show
    match: re.Pattern
    unless: re.Pattern | None = None

    def hit(self, text: str) -> bool:
        return bool(self.match.search(text)) and not (self.unless and self.unless.search(text))


@dataclass(frozen=True)
class RuleHit:
    category: str
    rule: str


class RuleSet:
    """Compiled rules in policy order; the first category with a hit wins, so the specific harm
    categories are listed before prompt_injection."""

    def __init__(self, rules: dict[str, list], order: list[str]):
        self.rules: list[Rule] = []
        for category in order:
            for i, spec in enumerate(rules.get(category) or []):
                if isinstance(spec, str):
                    match, unless = spec, None
                else:
                    match, unless = spec.match, spec.unless
                self.rules.append(Rule(category, f"{category}.{i}", re.compile(match),
                                       re.compile(unless) if unless else None))

    def __len__(self) -> int:
        return len(self.rules)

    def check(self, texts: list[str]) -> RuleHit | None:
        for rule in self.rules:
            for t in texts:
                if rule.hit(t):
                    return RuleHit(rule.category, rule.name)
        return None
