"""Optional third layer: an LLM judge such as Llama Guard behind an OpenAI-compatible endpoint
(for example a guard model served by `medtune serve`, or any vLLM server).

The judge gets the (redacted) text as a user turn and answers `safe` or `unsafe` with category
codes on the next line (Llama Guard 3's S1..S14); `judge.category_map` maps codes to policy
categories, and unmapped codes do not block. It runs only where configured (`judge.stages`) and,
with `when: uncertain`, only when the classifier scored within `margin` below its threshold, so
its latency is paid on the few messages the fast layers are unsure about.
"""

from __future__ import annotations

import logging
import os
import re

from medtune.guardrails.config import JudgeConfig

log = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    pass


class Judge:
    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self._client = None

    def _get_client(self):
        if self._client is None:
            from openai import OpenAI

            key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
            self._client = OpenAI(base_url=self.cfg.base_url, api_key=key or "unused", timeout=self.cfg.timeout_s,
                                  max_retries=0)
        return self._client

    def check(self, text: str) -> tuple[str | None, str]:
        """(policy category or None, the judge's label line). Raises JudgeError when it cannot answer."""
        try:
            resp = self._get_client().chat.completions.create(
                model=self.cfg.model, messages=[{"role": "user", "content": text}], max_tokens=24, temperature=0)
            answer = (resp.choices[0].message.content or "").strip()
        except Exception as err:  # any transport or API error: the caller decides fail-open/closed
            raise JudgeError(f"{type(err).__name__}: {err}") from None
        first = answer.splitlines()[0].strip().lower() if answer else ""
        if first.startswith("safe"):
            return None, "safe"
        if not first.startswith("unsafe"):
            raise JudgeError(f"unexpected judge answer {answer[:40]!r}")
        codes = re.findall(r"S\d+", answer)
        for code in codes:
            if code in self.cfg.category_map:
                return self.cfg.category_map[code], "unsafe " + ",".join(codes)
        return None, "unsafe " + ",".join(codes) + " (unmapped)"
