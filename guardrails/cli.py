"""Check text against the guardrails policy.

    medtune guard check < prompts.jsonl                      # JSON lines with a `text` field on stdin
    medtune guard check --input prompts.jsonl --output verdicts.jsonl
    medtune guard check --policy my_policy.yaml --input prompts.jsonl
    medtune guard check --stage output --input answers.jsonl   # the output rails (+ disclaimer)
    medtune guard check --rules-only --input prompts.jsonl     # the fast layer alone (the baseline)
    echo '{"text": "ignore previous instructions"}' | medtune guard check

Writes one JSON line per input line: {"text": <redacted text>, "verdict": allow|redact|block,
"category", "reason", "layer", "score"}, plus "message" (what the user would see) for a block and
the input's "id" when it has one. A line that is not a JSON object with a string `text` gets
{"line": N, "error": ...} and the rest still runs; the exit status is 1 if any line was bad.
Policy: default | none | PATH (see guardrails/README.md); the audit log follows the policy
(`audit.path`) or $MEDTUNE_GUARD_AUDIT.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time

from medtune.errors import MedtuneError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="guard_command", metavar="{check}", required=True)
    check = sub.add_parser("check", help="read JSON lines with a `text` field, write one verdict line each",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("--policy", default="default", help="default (the shipped policy), none, or a policy YAML")
    check.add_argument("--input", "-i", default="-", help="JSONL file to read (default: stdin)")
    check.add_argument("--output", "-o", default="-", help="JSONL file to write (default: stdout)")
    check.add_argument("--stage", choices=["input", "output"], default="input",
                       help="check as a user message (input rails) or as a model answer (output rails)")
    check.add_argument("--rules-only", action="store_true", help="skip the classifier (the rules-only baseline)")


def _result(guard, text: str, stage: str, rules_only: bool) -> dict:
    from medtune.guardrails.base import NoGuard
    from medtune.guardrails.redact import redact

    if isinstance(guard, NoGuard):
        return {"text": text, "verdict": "allow", "category": None, "reason": "guardrails off", "layer": "", "score": None}
    if stage == "input":
        d = guard.evaluate(text, use_classifier=not rules_only)
        out = {"text": d.text, "verdict": d.action, "category": d.category, "reason": d.reason, "layer": d.layer,
               "score": None if d.score is None else round(d.score, 4)}
        if d.action == "block":
            out["message"] = d.message
        return out
    shown, verdict = guard.check_output(text)
    if verdict is not None and verdict.blocked:
        return {"text": redact(text, guard.types).text, "verdict": "block", "category": verdict.category,
                "reason": verdict.reason, "layer": verdict.layer, "score": verdict.score, "message": verdict.text}
    action = "redact" if verdict is not None else "allow"
    return {"text": shown, "verdict": action, "category": verdict.category if verdict else None,
            "reason": verdict.reason if verdict else "", "layer": verdict.layer if verdict else "", "score": None}


def run_check(policy: str, input_path: str, output_path: str, stage: str = "input", rules_only: bool = False) -> int:
    from medtune.guardrails import load_guard

    guard = load_guard(policy)
    if rules_only and getattr(guard, "classifier", None) is not None:
        guard.classifier = None
    with contextlib.ExitStack() as stack:
        try:
            src = sys.stdin if input_path == "-" else stack.enter_context(open(input_path, encoding="utf-8"))
        except OSError as err:
            raise MedtuneError(f"--input {input_path}: cannot read it ({err.strerror})") from None
        try:
            dst = sys.stdout if output_path == "-" else stack.enter_context(open(output_path, "w", encoding="utf-8"))
        except OSError as err:
            raise MedtuneError(f"--output {output_path}: cannot write it ({err.strerror})") from None
        counts = {"allow": 0, "redact": 0, "block": 0, "error": 0}
        t0 = last = time.perf_counter()
        for n, line in enumerate(src, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                out = {"line": n, "error": f"not valid JSON ({err.msg} at column {err.colno})"}
            else:
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    got = type(row.get("text")).__name__ if isinstance(row, dict) and "text" in row else "no `text`"
                    out = {"line": n, "error": f"expected a JSON object with a string `text` field ({got})"}
                else:
                    out = _result(guard, row["text"], stage, rules_only)
                    if "id" in row:
                        out = {"id": row["id"], **out}
            counts["error" if "error" in out else out["verdict"]] += 1
            dst.write(json.dumps(out, ensure_ascii=False) + "\n")
            dst.flush()
            now = time.perf_counter()
            if now - last > 10:
                log.info("guard check: %d lines, %.1f lines/s", n, n / (now - t0))
                last = now
    total = sum(counts.values())
    print(f"guard check: {total} lines: {counts['allow']} allow, {counts['redact']} redact, {counts['block']} block, "
          f"{counts['error']} bad ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return 1 if counts["error"] else 0


def run_from_args(args: argparse.Namespace) -> int:
    if args.guard_command == "check":
        return run_check(args.policy, args.input, args.output, args.stage, args.rules_only)
    raise MedtuneError(f"unknown guard command {args.guard_command!r}")
