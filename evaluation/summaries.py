"""Side inputs of the report: the training run's `metrics.jsonl` and the chatbot's votes file.

Both are summaries, read after the evaluation's own checks: the training log tolerates a torn
last line (a run killed mid-write) and counts what it skipped; the votes file is checked before
any scoring starts, so a bad line fails fast with file:line.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from medtune.errors import MedtuneError


def read_training_metrics(path: Path) -> dict:
    """Loss curve, eval loss/perplexity per evaluation and throughput of one training run."""
    path = Path(path)
    train, evals, checkpoints = [], [], []
    bad = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(row, dict):
                bad += 1
                continue
            kind = row.get("type")
            if kind == "train" and _num(row.get("loss")) is not None and row.get("step") is not None:
                train.append(row)
            elif kind == "eval" and _num(row.get("eval_loss")) is not None:
                evals.append(row)
            elif kind == "checkpoint":
                checkpoints.append(row)
    summary: dict = {"file": str(path), "skipped_lines": bad, "train_points": len(train), "eval_points": len(evals)}
    if train:
        losses = [float(r["loss"]) for r in train]
        rates = [float(r["tokens_per_s"]) for r in train if _num(r.get("tokens_per_s")) is not None]
        times = [float(r["time"]) for r in train if _num(r.get("time")) is not None]
        summary.update(
            steps=int(train[-1]["step"]),
            epochs=_num(train[-1].get("epoch")),
            first_loss=losses[0],
            last_loss=losses[-1],
            min_loss=min(losses),
            tokens=train[-1].get("tokens"),
            mean_tokens_per_s=(sum(rates) / len(rates)) if rates else None,
            duration_s=(times[-1] - times[0]) if len(times) > 1 else None,
        )
    summary["loss_curve"] = [[int(r["step"]), float(r["loss"])] for r in train]
    summary["evals"] = [
        {"step": r.get("step"), "epoch": r.get("epoch"), "eval_loss": float(r["eval_loss"]),
         "eval_perplexity": _num(r.get("eval_perplexity")) or math.exp(min(float(r["eval_loss"]), 50.0))}
        for r in evals
    ]
    summary["last_checkpoint"] = checkpoints[-1].get("path") if checkpoints else None
    run_summary = path.parent / "summary.json"
    if run_summary.is_file():
        try:
            summary["run_summary"] = json.loads(run_summary.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            summary["run_summary"] = None
    return summary


def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# The chatbot (`medtune chat`, schema medtune-chat-vote/1) appends one JSON object per vote:
# {"vote": "left"|"right"|"tie"|"both_bad", "winner": <model id or null>, "models": {"left": id,
# "right": id}, "checkpoint": "<run_id>/step_N", ...}. A vote counts for its winner's model id; a
# "left"/"right" vote without a winner is resolved through "models"; ties and "both bad" count as such.
SIDE_VOTES = ("left", "right")


def read_votes(path: Path) -> dict:
    """Tally a votes file: {"votes": n, "tally": {"run/step_3": 7, "base": 2, "tie": 1}, "by_checkpoint": ...}."""
    path = Path(path)
    if not path.is_file():
        raise MedtuneError(f"--votes file not found: {path}")
    tally: Counter = Counter()
    by_checkpoint: dict[str, Counter] = {}
    total = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise MedtuneError(f"{where}: invalid JSON at column {err.colno} ({err.msg}); "
                                   "the votes file needs one JSON object per line (as `medtune chat` writes)") from None
            if not isinstance(row, dict):
                raise MedtuneError(f"{where}: expected a JSON object, got {type(row).__name__}")
            vote, winner = row.get("vote"), row.get("winner")
            if not winner and vote in SIDE_VOTES and isinstance(row.get("models"), dict):
                winner = row["models"].get(vote)
            outcome = winner or vote
            if not isinstance(outcome, str) or not outcome:
                raise MedtuneError(f"{where}: no vote in this record (expected 'vote' and/or 'winner', "
                                   "as `medtune chat` writes them)")
            if vote in SIDE_VOTES and not winner:
                raise MedtuneError(f"{where}: vote {vote!r} but no model named for that side ('winner' or 'models')")
            outcome = {"both_bad": "both bad"}.get(outcome, outcome)
            tally[outcome] += 1
            by_checkpoint.setdefault(str(row.get("checkpoint") or "-"), Counter())[outcome] += 1
            total += 1
    if total == 0:
        raise MedtuneError(f"{path}: no votes (the file is empty)")
    return {"file": str(path), "votes": total, "tally": dict(tally.most_common()),
            "by_checkpoint": {k: dict(v.most_common()) for k, v in sorted(by_checkpoint.items())}}
