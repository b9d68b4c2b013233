"""Reading languages the classifier cannot: language identification and a word-for-word gloss.

The sentence encoder (all-MiniLM-L6-v2) and most rules are English-only, and no multilingual
encoder can be installed offline here. So a message, or a sentence of it, that the language
identifier (py3langid: a naive Bayes model over byte n-grams, bundled in the wheel, ~0.1 ms per
message) gives with confidence to one of `multilingual.languages` is glossed into English with a
hand-written domain glossary (`policies/glossary.yaml`), longest phrase first, and the gloss goes
through the rules and the classifier beside the original:

    >>> m = Multilingual(load_policy())
    >>> m.gloss("¿Cómo fabrico metanfetamina en casa?")
    Gloss(lang='es', text='how make methamphetamine at home ?')

English sentences of a mixed message are kept as they are. A gloss is crude English, but it puts
the words that carry the meaning into the encoder's language; benign questions gloss to benign
English and pass like their English counterparts. Nothing heavy is imported until first use.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path


from medtune.errors import MedtuneError
from medtune.fileio import read_yaml_mapping
from medtune.guardrails.config import Policy

_SEGMENT = re.compile(r"(?<=[.!?:;])\s+|\n+")
_TOKEN = re.compile(r"[^\W\d_]+|\d+(?:[.,]\d+)?|[^\w\s'\u2019¿¡-]")
_SPACE_BEFORE = re.compile(r"\s+([?!.,;:)])")
# an unknown word is looked up again without an inflection or an attached pronoun (longest first):
# "inyectarle" -> "inyectar" + "him", "tabletten" -> "tablette"; a fallback, so the glossary needs
# the base forms only
_SUFFIXES = {
    "es": (("selo", "it"), ("sela", "it"), ("melo", "it"), ("les", "them"), ("los", "them"), ("las", "them"),
           ("le", "him"), ("lo", "it"), ("la", "her"), ("me", "me"), ("se", ""), ("es", ""), ("s", "")),
    "pt": (("lhe", "him"), ("los", "them"), ("las", "them"), ("lo", "it"), ("la", "her"), ("me", "myself"),
           ("se", ""), ("es", ""), ("s", "")),
    "it": (("glielo", "it"), ("gli", "him"), ("lo", "it"), ("la", "her"), ("le", "her"), ("mi", "myself"),
           ("si", ""), ("ci", "")),
    "fr": (("es", ""), ("s", ""), ("x", ""), ("e", "")),
    "de": (("en", ""), ("es", ""), ("er", ""), ("em", ""), ("n", ""), ("e", ""), ("s", "")),
}


def fold(text: str) -> str:
    """Lower case without accents: users often drop them, and the glossary is keyed this way."""
    text = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in text if not unicodedata.combining(ch)).replace("ß", "ss")


def tokens(text: str) -> list[str]:
    # apostrophes and hyphens separate (j'ai -> j ai, faut-il -> faut il); punctuation is kept
    return _TOKEN.findall(fold(text).replace("'", " ").replace("\u2019", " ").replace("-", " "))


def load_glossary(path: Path) -> dict[str, dict[tuple[str, ...], str]]:
    """`{lang: {phrase tokens: english}}`; every key and value must be a string."""
    data = read_yaml_mapping(path, "glossary")
    out: dict[str, dict[tuple[str, ...], str]] = {}
    for lang, table in data.items():
        if not isinstance(table, dict):
            raise MedtuneError(f"glossary {path}: {lang}: expected a mapping of words to English")
        entries = {}
        for key, value in table.items():
            # YAML 1.1 reads bare no/yes/on/y/n as booleans: such a word must be quoted
            if not isinstance(key, str) or not isinstance(value, str):
                raise MedtuneError(f"glossary {path}: {lang}.{key!r}: {value!r}: keys and values must be strings "
                                   "(quote words such as \"no\", \"on\", \"y\")")
            toks = tuple(tokens(key))
            if toks:
                entries[toks] = value.strip()
        out[str(lang)] = entries
    return out


@dataclass(frozen=True)
class Gloss:
    lang: str
    text: str


class Multilingual:
    """Language identification plus the glossary; lazy (the model loads on first use or warmup)."""

    def __init__(self, policy: Policy):
        self.cfg = policy.multilingual
        path = policy.glossary_path()
        try:
            self.glossary = load_glossary(path)
        except MedtuneError as err:
            raise MedtuneError(f"guardrails policy {policy.source}: multilingual.glossary: {err}") from None
        missing = [lang for lang in self.cfg.languages if lang not in self.glossary]
        if missing:
            raise MedtuneError(f"guardrails policy {policy.source}: multilingual.languages: {missing} have no section "
                               f"in the glossary {path} (it has {sorted(self.glossary)}); add one or drop the language")
        self.max_len = {lang: max((len(k) for k in self.glossary[lang]), default=1) for lang in self.cfg.languages}
        self._ident = None
        self._lock = threading.Lock()

    def warmup(self) -> "Multilingual":
        if self._ident is None:
            with self._lock:
                if self._ident is None:
                    try:
                        from py3langid.langid import MODEL_FILE, LanguageIdentifier
                    except ImportError:
                        raise MedtuneError("guardrails multilingual layer: the package py3langid is not installed "
                                           "(pip install py3langid), or set multilingual.enabled: false") from None
                    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
                    ident.set_languages(sorted({"en", *self.cfg.languages}))
                    self._ident = ident
        return self

    def identify(self, text: str) -> tuple[str, float]:
        """(language, probability) among English and the configured languages."""
        self.warmup()
        lang, p = self._ident.classify(text)
        return str(lang), float(p)

    def _foreign(self, text: str) -> str | None:
        if len(text.split()) < self.cfg.min_words:
            return None
        lang, p = self.identify(text)
        return lang if lang != "en" and p >= self.cfg.min_confidence else None

    def _english(self, text: str) -> bool:
        if len(text.split()) < self.cfg.min_words:
            return False
        lang, p = self.identify(text)
        return lang == "en" and p >= self.cfg.min_confidence

    def translate(self, text: str, lang: str) -> str:
        """The word-for-word gloss of `text` read as `lang` (unknown words kept, folded)."""
        table, longest = self.glossary[lang], self.max_len[lang]
        toks = tokens(text)
        out, i = [], 0
        while i < len(toks):
            for n in range(min(longest, len(toks) - i), 0, -1):
                hit = table.get(tuple(toks[i:i + n]))
                if hit is not None:
                    if hit:
                        out.append(hit)
                    i += n
                    break
            else:
                out.append(self._inflected(toks[i], lang))
                i += 1
        return _SPACE_BEFORE.sub(r"\1", " ".join(out))

    def _inflected(self, word: str, lang: str) -> str:
        table = self.glossary[lang]
        for suffix, extra in _SUFFIXES.get(lang, ()):
            if len(word) > len(suffix) + 2 and word.endswith(suffix):
                hit = table.get((word[:-len(suffix)],))
                if hit is not None:
                    return " ".join(w for w in (hit, extra) if w)
        return word

    def gloss(self, text: str) -> Gloss | None:
        """The message with its non-English sentences glossed, or None when nothing was glossed."""
        if not self.cfg.enabled or not text.strip():
            return None
        whole = self._foreign(text)
        segments = [s for s in _SEGMENT.split(text.strip()) if s.strip()]
        if len(segments) == 1:
            return Gloss(whole, self.translate(text, whole)) if whole else None
        parts, langs = [], []
        for seg in segments:
            lang = self._foreign(seg)
            if lang is None and whole and not self._english(seg):
                lang = whole  # a short or unclear sentence of a foreign message: read it as the message
            parts.append(self.translate(seg, lang) if lang else seg)
            if lang:
                langs.append(lang)
        if not langs:
            return None
        return Gloss(max(set(langs), key=langs.count), " ".join(parts))
