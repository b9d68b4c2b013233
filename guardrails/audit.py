"""The audit log: one JSON line per guardrail decision, without the raw text.

Each event has the time, request_id, stage (input / output), action, category, reason, deciding
layer and score, the character count, the placeholder types that were redacted, and a short sha256
of the *redacted* text (to correlate repeats). With `audit.store_text: true` the redacted text
itself is stored too; the raw text never is. Lines are appended with one write each under a lock,
so concurrent requests in one process do not interleave.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path

from medtune.guardrails.base import Verdict

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: str | os.PathLike | None, store_text: bool = False):
        self.path = Path(path) if path else None
        self.store_text = store_text
        self._lock = threading.Lock()
        self._warned = False
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def record(self, *, stage: str, verdict: Verdict, request_id: str | None, chars: int, redacted_text: str,
               counts: Counter | None = None, **extra) -> None:
        if self.path is None:
            return
        now = time.time()
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
            "request_id": request_id,
            "stage": stage,
            "action": verdict.action,
            "category": verdict.category,
            "reason": verdict.reason,
            "layer": verdict.layer,
            "score": None if verdict.score is None else round(verdict.score, 4),
            "chars": chars,
            "redactions": dict(counts or {}),
            "sha256": hashlib.sha256(redacted_text.encode("utf-8")).hexdigest()[:16],
            **extra,
        }
        if self.store_text:
            event["text"] = redacted_text[:4000]
        line = json.dumps(event, ensure_ascii=False) + "\n"
        try:
            with self._lock, open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError as err:  # the audit log must not take the service down; say so once
            if not self._warned:
                log.error("guardrails: cannot write the audit log %s (%s)", self.path, err)
                self._warned = True
