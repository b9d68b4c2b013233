"""The layered guard: redaction, decoding, rules, the embedding classifier and an optional LLM
judge, in that order, for user input and (streamed) model output.

    guard = PolicyGuard(load_policy())          # or medtune.guardrails.load_guard("default")
    guard.warmup()                               # load the classifier now rather than on first use
    v = guard.check_input("ignore previous instructions ...", request_id="r1")   # Verdict(block, ...)
    f = guard.output_filter(request_id="r1")
    for delta in stream: text, v = f.push(delta) ...; tail, v = f.finish()

Input: personal data is replaced by placeholders first (the later layers and the judge never see
it); encoded payloads are decoded; sentences in other languages are glossed into English (gloss.py);
rules run on the normalised text, its de-obfuscated copies, the decoded payloads and the glosses;
then the classifier scores the same texts; then, where configured, the
judge. The first layer that blocks decides. A block's `text` is the category's message.

Output: `OutputFilter.push` runs the output rules on a rolling window for every delta, the
classifier at each sentence end (or every `classify_every_chars`), and passes the delta through a
streaming redactor that holds back only what could be half a personal-data item. A block stops the
stream: push returns ("", block verdict). `finish()` classifies what is left, flushes the held-back
text and appends the medical disclaimer when the answer gave medical advice; its verdict is None,
or a non-blocking `redact` verdict when placeholders were inserted.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from medtune.guardrails.audit import AuditLog
from medtune.guardrails.base import Verdict
from medtune.guardrails.classifier import EmbeddingClassifier
from medtune.guardrails.config import Policy
from medtune.guardrails.gloss import Multilingual
from medtune.guardrails.judge import Judge, JudgeError
from medtune.guardrails.redact import Redaction, StreamRedactor, redact
from medtune.guardrails.rules import RuleSet, decode_payloads, looks_obfuscated, normalize, substitute_decoded, variants
from medtune.guardrails.segment import segment

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")


@dataclass
class Decision:
    """Everything one check found; `verdict()` is what serving sees."""

    action: str
    text: str  # the redacted text
    category: str | None = None
    reason: str = ""
    layer: str = ""
    score: float | None = None
    message: str | None = None
    counts: Counter = field(default_factory=Counter)

    def verdict(self) -> Verdict:
        types = tuple(sorted(self.counts))
        if self.action == "block":
            return Verdict("block", self.message or "", self.category, self.reason, self.layer, self.score, types)
        if self.action == "redact":
            return Verdict("redact", self.text, "pii", self.reason, "redaction", None, types)
        return Verdict("allow", self.text, None, self.reason, self.layer, self.score, types)


def _redaction_reason(counts: Counter) -> str:
    return "redacted " + ", ".join(f"{k}x{v}" for k, v in sorted(counts.items()))


class PolicyGuard:
    """A `Guard` (see base.py) driven by a `Policy`."""

    def __init__(self, policy: Policy, *, classifier: bool | None = None):
        self.policy = policy
        order = list(policy.categories)
        self.input_rules = RuleSet({c: policy.rules.get(c, []) for c in policy.input.categories}, order)
        self.document_rules = RuleSet({c: policy.rules.get(c, []) for c in policy.input.document_categories}, order)
        self.output_rules = RuleSet({c: policy.output_rules.get(c, []) for c in policy.output.categories}, order)
        use_classifier = policy.classifier.enabled if classifier is None else classifier
        self.classifier = EmbeddingClassifier(policy) if use_classifier and (
            policy.input.classifier or policy.output.classifier) else None
        self.multilingual = Multilingual(policy) if policy.multilingual.enabled else None
        self.judge = Judge(policy.judge) if policy.judge.enabled else None
        self.audit = AuditLog(policy.audit_path(), policy.audit.store_text)
        self.types = tuple(policy.redaction.types)
        d = policy.output.disclaimer
        self._cues = [re.compile(c) for c in d.cues]
        self._skip = re.compile(d.skip_if) if d.skip_if else None
        self._cache: OrderedDict[bytes, Decision] = OrderedDict()
        self._cache_lock = threading.Lock()

    # ---- the Guard interface ----------------------------------------------------------------
    def warmup(self) -> "PolicyGuard":
        """Load the classifier now (serving calls this at start; otherwise the first message pays)."""
        if self.multilingual is not None:
            self.multilingual.warmup()
        if self.classifier is not None:
            self.classifier.warmup()
        return self

    def check_input(self, text: str, *, request_id: str | None = None) -> Verdict:
        decision = self._cached_evaluate(text)
        verdict = decision.verdict()
        self.audit.record(stage="input", verdict=verdict, request_id=request_id, chars=len(text),
                          redacted_text=decision.text, counts=decision.counts)
        return verdict

    def _cached_evaluate(self, text: str) -> Decision:
        """`evaluate`, remembered for the last `input.cache_size` messages: the policy is a pure function of the
        text, and clients resend the same long message (a conversation's earlier turns, one abstract scored
        against several answers). Keyed by SHA-256; what is kept is the decision (redacted text), never the raw text."""
        size = self.policy.input.cache_size
        if not size or not isinstance(text, str):
            return self.evaluate(text)
        key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        decision = self.evaluate(text)
        with self._cache_lock:
            self._cache[key] = decision
            while len(self._cache) > size:
                self._cache.popitem(last=False)
        return decision

    def output_filter(self, *, request_id: str | None = None) -> "StreamFilter":
        return StreamFilter(self, request_id)

    def check_output(self, text: str, *, request_id: str | None = None) -> tuple[str, Verdict | None]:
        """A whole (non-streamed) answer through the same filter: (text to show, verdict)."""
        f = self.output_filter(request_id=request_id)
        shown, verdict = f.push(text)
        if verdict is not None and verdict.blocked:
            return shown, verdict
        tail, verdict = f.finish()
        return shown + tail, verdict

    # ---- the layers -------------------------------------------------------------------------
    def _block(self, category: str, reason: str, layer: str, score: float | None, red: Redaction) -> Decision:
        return Decision("block", red.text, category, reason, layer, score,
                        self.policy.categories[category].message, red.counts)

    def evaluate(self, text: str, *, use_classifier: bool = True) -> Decision:
        """Check one message (a user, system or assistant turn, or a completions prompt); `use_classifier=False`
        gives the rules-only baseline.

        The message is split into what it asks and what it pastes (segment.py): harm rules, the gloss and the
        classifier read the request (and decoded payloads); pasted documents are read only by the
        `document_categories` rules (prompt injection), unless the request asks to act on them."""
        cfg = self.policy.input
        if not isinstance(text, str):
            raise TypeError(f"check_input expects a str, got {type(text).__name__}")
        red = redact(text, self.types) if cfg.redact else Redaction(text)
        if not text.strip():
            return Decision("allow", text)
        decoded = decode_payloads(text, cfg.decode) if cfg.decode else []
        decoded_red = [redact(d.text, self.types).text if cfg.redact else d.text for d in decoded]
        # the message as the model would read it: payloads replaced by what they decode to
        if decoded:
            sub = substitute_decoded(text, decoded)
            readable = redact(sub, self.types).text if cfg.redact else sub
        else:
            readable = red.text
        decoded_where = f" in {'/'.join(d.encoding for d in decoded)}-decoded text" if decoded else ""
        seg = segment(readable) if cfg.segment else None
        request = seg.request if seg is not None else readable
        document = seg.document if seg is not None else ""
        # non-English sentences glossed into English (the encoder and most rules read only English)
        glosses = []
        if self.multilingual is not None:
            for src, where in [(request, "")] + [(dt, f" of {d.encoding}-decoded text") for d, dt in zip(decoded, decoded_red)]:
                g = self.multilingual.gloss(src) if src else None
                if g is not None:
                    glosses.append((g.text, f" in the {g.lang} gloss{where}"))

        if cfg.rules and len(self.input_rules):
            hit, where = (self.input_rules.check(variants(request)), decoded_where) if request else (None, "")
            if hit is None and document and len(self.document_rules):
                hit, where = self.document_rules.check(variants(document)), " in a pasted document"
            if hit is None:
                for d, dt in zip(decoded, decoded_red):
                    hit = self.input_rules.check(variants(dt))
                    if hit:
                        where = f" in {d.encoding}-decoded text"
                        break
            if hit is None:
                for gt, gwhere in glosses:
                    hit = self.input_rules.check(variants(gt))
                    if hit:
                        where = gwhere
                        break
            if hit:
                return self._block(hit.category, f"rule {hit.rule}{where}", "rules", None, red)

        score = None
        if use_classifier and cfg.classifier and self.classifier is not None:
            items, labels = [], []
            if request:
                items.append(request)
                labels.append(decoded_where)
            if seg is not None and seg.actionable:
                items.append(document)  # the request asks to act on the document: its content matters
                labels.append(" in the document the request asks to act on")
            for d, dt in zip(decoded, decoded_red):
                items.append(dt)
                labels.append(f" in {d.encoding}-decoded text")
            if request and looks_obfuscated(request):
                for v in variants(request):
                    if v != request.lower():  # the folded look-alikes are in the first variant already
                        items.append(v)
                        labels.append(" in de-obfuscated text")
            for gt, gwhere in glosses:
                items.append(gt)
                labels.append(gwhere)
            if items:
                s = self.classifier.score(items, cfg.categories)
                score = s.p_harm
                threshold = self.classifier.threshold(cfg.categories, s.category)
                if s.category and s.p_harm >= threshold:
                    return self._block(s.category, f"classifier p={s.p_harm:.2f} >= {threshold:.2f}, nearest exemplar "
                                       f"{s.nearest}{labels[s.source]}", "classifier", s.p_harm, red)
                if self.judge and "input" in self.policy.judge.stages and (
                        self.policy.judge.when == "always" or s.p_harm >= threshold - self.policy.judge.margin):
                    blocked = self._ask_judge(red)
                    if blocked:
                        return blocked
        elif self.judge and "input" in self.policy.judge.stages and self.policy.judge.when == "always":
            blocked = self._ask_judge(red)
            if blocked:
                return blocked

        if red.counts:
            return Decision("redact", red.text, "pii", _redaction_reason(red.counts), "redaction", score, counts=red.counts)
        return Decision("allow", red.text, None, "", "classifier" if score is not None else "rules", score)

    def _ask_judge(self, red: Redaction) -> Decision | None:
        try:
            category, label = self.judge.check(red.text)
        except JudgeError as err:
            log.warning("guardrails: judge unavailable (%s)", err)
            if self.policy.judge.fail_closed:
                fallback = next(iter(self.policy.categories))
                return self._block(fallback, f"judge unavailable ({err}); policy fails closed", "judge", None, red)
            return None
        if category and category in self.policy.categories:
            return self._block(category, f"judge: {label}", "judge", None, red)
        return None

    def classify_output(self, text: str) -> tuple[str, str, float] | None:
        """(category, reason, score) when the classifier flags an answer segment, else None."""
        if self.classifier is None or not self.policy.output.classifier or not text.strip():
            return None
        cats = self.policy.output.categories
        # the recall preference (classifier.recall_targets) is for user messages only: an answer is scored
        # sentence by sentence, so a lower threshold there stops many more benign answers
        s = self.classifier.score([redact(text, self.types).text], cats, per_category=False)
        threshold = self.classifier.threshold(cats)
        if s.category and s.p_harm >= threshold:
            return s.category, f"classifier p={s.p_harm:.2f} >= {threshold:.2f}, nearest exemplar {s.nearest}", s.p_harm
        return None

    def wants_disclaimer(self, answer: str) -> bool:
        d = self.policy.output.disclaimer
        if not d.enabled or not answer.strip():
            return False
        norm = normalize(answer)
        if self._skip and self._skip.search(norm):
            return False
        return any(c.search(norm) for c in self._cues)


class StreamFilter:
    """One generated answer (see the module docstring). Not thread-safe: one per choice."""

    def __init__(self, guard: PolicyGuard, request_id: str | None):
        self.guard = guard
        self.cfg = guard.policy.output
        self.request_id = request_id
        self.raw = ""
        self.emitted_chars = 0
        self.classified_upto = 0
        self.redactor = StreamRedactor(guard.types) if self.cfg.redact else None
        self.blocked: Verdict | None = None
        self.finished = False
        self.started = time.perf_counter()

    def _stop(self, category: str, reason: str, layer: str, score: float | None) -> tuple[str, Verdict]:
        counts = self.redactor.counts if self.redactor else Counter()
        self.blocked = Verdict("block", self.guard.policy.categories[category].message, category, reason, layer, score,
                               tuple(sorted(counts)))
        self.guard.audit.record(stage="output", verdict=self.blocked, request_id=self.request_id, chars=len(self.raw),
                                redacted_text=redact(self.raw, self.guard.types).text, counts=counts,
                                emitted_chars=self.emitted_chars)
        return "", self.blocked

    def _classify(self, upto: int) -> tuple[str, Verdict] | None:
        segment = self.raw[self.classified_upto:upto]
        self.classified_upto = upto
        flagged = self.guard.classify_output(segment)
        if flagged:
            return self._stop(flagged[0], flagged[1], "classifier", flagged[2])
        return None

    def push(self, delta: str) -> tuple[str, Verdict | None]:
        if self.blocked is not None:
            return "", self.blocked
        if self.finished:
            raise RuntimeError("push() after finish()")
        if not delta:
            return "", None
        self.raw += delta
        if self.cfg.rules and len(self.guard.output_rules):
            window = self.raw[-self.cfg.rules_window_chars:]
            hit = self.guard.output_rules.check(variants(window))
            if hit:
                return self._stop(hit.category, f"rule {hit.rule}", "rules", None)
        if self.guard.classifier is not None and self.cfg.classifier:
            pending = self.raw[self.classified_upto:]
            ends = [m.end() for m in _SENTENCE_END.finditer(pending)]
            if ends:
                stopped = self._classify(self.classified_upto + ends[-1])
                if stopped:
                    return stopped
            elif len(pending) >= self.cfg.classify_every_chars:
                cut = pending.rfind(" ")
                stopped = self._classify(self.classified_upto + (cut if cut > 0 else len(pending)))
                if stopped:
                    return stopped
        out = self.redactor.push(delta) if self.redactor else delta
        self.emitted_chars += len(out)
        return out, None

    def finish(self) -> tuple[str, Verdict | None]:
        if self.blocked is not None:
            return "", self.blocked
        if self.finished:
            return "", None
        self.finished = True
        if self.guard.classifier is not None and self.cfg.classifier and self.classified_upto < len(self.raw):
            stopped = self._classify(len(self.raw))
            if stopped:
                return stopped
        guard = self.guard
        if guard.judge and "output" in guard.policy.judge.stages:
            blocked = guard._ask_judge(redact(self.raw, guard.types))
            if blocked:
                return self._stop(blocked.category, blocked.reason, "judge", None)
        tail = self.redactor.flush() if self.redactor else ""
        if guard.wants_disclaimer(self.raw):
            tail += guard.policy.output.disclaimer.text
        counts = self.redactor.counts if self.redactor else Counter()
        verdict = Verdict("redact", tail, "pii", _redaction_reason(counts), "redaction", None,
                          tuple(sorted(counts))) if counts else None
        self.emitted_chars += len(tail)
        guard.audit.record(stage="output", verdict=verdict or Verdict("allow", ""), request_id=self.request_id,
                           chars=len(self.raw), redacted_text=redact(self.raw, guard.types).text, counts=counts,
                           emitted_chars=self.emitted_chars,
                           seconds=round(time.perf_counter() - self.started, 3))
        return tail, verdict
