"""The guardrails contract: a verdict is a value, and a guard is anything with these methods.

Serving calls a `Guard` at two hook points: `check_input` on every piece of user-supplied
text before it reaches the engine, and an `OutputFilter` (one per generated choice) that
sees the model's text as it streams. Neither raises for a policy decision: they return a
`Verdict`. This module stays import-light (no torch, no ray) so any stage can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Action = Literal["allow", "redact", "block"]


@dataclass(frozen=True)
class Verdict:
    """What a guard decided about one piece of text.

    `text` is what to use instead of the input: the text itself (allow), the text with
    typed placeholders (redact), or the message to show the user (block).
    """

    action: Action
    text: str
    category: str | None = None
    reason: str = ""
    # Which layer decided ("rules", "classifier", "judge", "redaction"), its score where it has
    # one, and the placeholder types that replaced personal data (e.g. ("EMAIL", "PHONE")).
    layer: str = ""
    score: float | None = None
    redactions: tuple[str, ...] = ()

    @property
    def blocked(self) -> bool:
        return self.action == "block"


class OutputFilter(Protocol):
    """Watches one streamed answer. `push` returns the text that is safe to emit now (it may
    hold some back, e.g. a half-seen phone number) and, when the answer must stop, a block
    verdict whose `text` replaces the rest; `finish` flushes what was held back and may
    append (e.g. a disclaimer). `finish` may return a block (stop as for push) or a non-blocking
    `redact` verdict that only reports that placeholders were inserted; check `.blocked`."""

    def push(self, delta: str) -> tuple[str, Verdict | None]: ...

    def finish(self) -> tuple[str, Verdict | None]: ...


class Guard(Protocol):
    def check_input(self, text: str, *, request_id: str | None = None) -> Verdict: ...

    def output_filter(self, *, request_id: str | None = None) -> OutputFilter: ...


class _PassThrough:
    def push(self, delta: str) -> tuple[str, Verdict | None]:
        return delta, None

    def finish(self) -> tuple[str, Verdict | None]:
        return "", None


class NoGuard:
    """Lets everything through unchanged (`guardrails: none`)."""

    def check_input(self, text: str, *, request_id: str | None = None) -> Verdict:
        return Verdict("allow", text)

    def warmup(self) -> "NoGuard":
        return self

    def output_filter(self, *, request_id: str | None = None) -> OutputFilter:
        return _PassThrough()
