"""Guardrails: a measured safety policy around every request and response.

    from medtune.guardrails import load_guard
    guard = load_guard("default")      # None / "default": the shipped policy; "none": NoGuard; else a policy YAML
    guard.warmup()                     # optional: load the classifier now
    verdict = guard.check_input(text, request_id=rid)

Importing this package is cheap (pydantic and PyYAML only); the embedding model is loaded on
first use or by `warmup()`. See guardrails/README.md.
"""

from __future__ import annotations

from medtune.guardrails.base import Guard, NoGuard, OutputFilter, Verdict

__all__ = ["Guard", "NoGuard", "OutputFilter", "Verdict", "load_guard"]


def load_guard(spec: str | None = None) -> Guard:
    """None or "default" → the shipped default policy; "none" → NoGuard; otherwise the path of a
    policy YAML (a missing or invalid file raises MedtuneError naming the file and the field)."""
    if spec == "none":
        return NoGuard()
    from medtune.guardrails.config import load_policy
    from medtune.guardrails.policy import PolicyGuard

    return PolicyGuard(load_policy(None if spec in (None, "default") else spec))
