"""Scoring functions: decision parsing, option probabilities, accuracy / macro-F1 / confusion,
paired bootstrap intervals and ROUGE-L. Pure functions over plain lists and numpy arrays, so they
are unit-tested on hand-made cases without a model.

Labels are the three PubMedQA decisions; a prediction that is not one of them (an unparseable
generation, an unscored likelihood item, a blocked reply) is `None` and always counts as wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

from medtune.training.records import DECISIONS

INVALID = "invalid"  # the confusion-matrix column for predictions that are not a decision
LABELS: tuple[str, ...] = DECISIONS  # ("yes", "no", "maybe")

# Case and leading-space variants of each decision word: their probabilities are summed.
def option_variants(option: str) -> tuple[str, ...]:
    word = option.lower()
    forms = [word.capitalize(), word]
    return tuple(dict.fromkeys(forms + [" " + f for f in forms]))


# --- generate mode: the decision from the first words of an answer ---------------------------

# Leading noise a model may put before the decision word: markdown, quotes, an "Answer:" label,
# "The answer is", "Based on the context,". Only the *first* word after it is read: "no" occurs
# everywhere in medical prose ("no difference"), so searching the whole reply would misread.
_LEAD = re.compile(
    r"""^[\s"'`*_#>\-\(\[]*                                  # markdown, quotes, bullets
        (?:(?:based\s+on|according\s+to)\s+the\s+(?:context|abstract|study|evidence)\s*,?\s*)?
        (?:(?:the\s+|my\s+|final\s+|short\s+)*(?:answer|decision|response)\s*(?:is|would\s+be)?\s*[:\-]?\s*)?
        (?:\(?[a-c]\)\s*)?                                   # "(a) yes"
        [\s"'`*_\(\[]*""",
    re.IGNORECASE | re.VERBOSE,
)
_WORD = re.compile(r"(yes|no|maybe)\b", re.IGNORECASE)


def parse_decision(text: str | None) -> str | None:
    """The decision a generated answer starts with ("Yes. ..." -> "yes"), or None if it does not."""
    if not text:
        return None
    rest = text[_LEAD.match(text).end():]
    match = _WORD.match(rest)
    return match.group(1).lower() if match else None


# --- likelihood mode -----------------------------------------------------------------------

def option_logprobs_from_top(top_logprobs: Iterable[tuple[str, float]]) -> dict[str, float] | None:
    """Per-decision log-probability from one position's top-k (token, logprob) list.

    Tokens whose stripped, lower-cased text is a decision word ("Yes", " yes", "YES") count
    for it, summed in probability space. Decisions that do not appear get -inf (their
    probability is below the k-th token's). None when no decision appears at all (unscored).
    """
    mass = {label: 0.0 for label in LABELS}
    seen = False
    for token, logprob in top_logprobs:
        key = token.strip().lower()
        if key in mass and logprob is not None and math.isfinite(logprob):
            mass[key] += math.exp(logprob)
            seen = True
    if not seen:
        return None
    return {label: (math.log(p) if p > 0 else -math.inf) for label, p in mass.items()}


def pick_option(logprobs: dict[str, float] | None) -> str | None:
    """The most likely decision (ties go to the first in yes/no/maybe order), None if unscored."""
    if not logprobs:
        return None
    best = max(LABELS, key=lambda label: (logprobs.get(label, -math.inf), -LABELS.index(label)))
    return best if math.isfinite(logprobs.get(best, -math.inf)) else None


# --- metrics ----------------------------------------------------------------------------------

def _encode(values: Sequence[str | None]) -> np.ndarray:
    """yes/no/maybe -> 0/1/2; anything else -> 3 (invalid)."""
    index = {label: i for i, label in enumerate(LABELS)}
    return np.array([index.get(v, len(LABELS)) for v in values], dtype=np.int64)


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str | None]) -> dict:
    """Accuracy, macro-F1 over yes/no/maybe (scikit-learn) and the confusion matrix.

    Invalid predictions are false negatives of their true class and nobody's false positive; the
    confusion matrix has one row per true decision and a fourth column, `invalid`, for them.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    if not y_true:
        return {"n": 0, "accuracy": None, "macro_f1": None, "per_class_f1": {}, "invalid": 0,
                "confusion": {"labels": list(LABELS), "columns": [*LABELS, INVALID], "matrix": []}}
    pred = [p if p in LABELS else INVALID for p in y_pred]
    columns = [*LABELS, INVALID]
    matrix = confusion_matrix(list(y_true), pred, labels=columns)[: len(LABELS)]
    per_class = f1_score(list(y_true), pred, labels=list(LABELS), average=None, zero_division=0.0)
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(list(y_true), pred)),
        "macro_f1": float(np.mean(per_class)),
        "per_class_f1": {label: float(f) for label, f in zip(LABELS, per_class)},
        "invalid": int(sum(p == INVALID for p in pred)),
        "confusion": {"labels": list(LABELS), "columns": columns, "matrix": matrix.tolist()},
    }


def _macro_f1_rows(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Macro-F1 of each row of (resamples, n) code arrays, vectorised (same definition as
    `classification_metrics`: classes absent from truth and prediction score 0)."""
    scores = []
    for c in range(len(LABELS)):
        is_t, is_p = true == c, pred == c
        tp = np.sum(is_t & is_p, axis=-1)
        fp = np.sum(~is_t & is_p, axis=-1)
        fn = np.sum(is_t & ~is_p, axis=-1)
        denom = 2 * tp + fp + fn
        scores.append(np.divide(2 * tp, denom, out=np.zeros(denom.shape, dtype=float), where=denom > 0))
    return np.mean(scores, axis=0)


def _interval(samples: np.ndarray, level: float) -> list[float]:
    lo, hi = np.percentile(samples, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


def bootstrap(
    y_true: Sequence[str],
    predictions: dict[str, Sequence[str | None]],
    pairs: Sequence[tuple[str, str]] = (),
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Percentile bootstrap intervals for accuracy and macro-F1 of each model, and for the paired
    difference (second minus first) of each pair. Every model is scored on the *same* resampled
    items, so a pair's difference keeps the pairing (the per-item correlation between models).
    """
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    true = _encode(y_true)
    n = len(true)
    out: dict = {"resamples": resamples, "seed": seed, "level": level, "models": {}, "pairs": []}
    if n == 0:
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    t = true[idx]
    acc, f1 = {}, {}
    for name, pred in predictions.items():
        p = _encode(pred)[idx]
        acc[name] = np.mean(p == t, axis=1)
        f1[name] = _macro_f1_rows(t, p)
        out["models"][name] = {"accuracy_ci": _interval(acc[name], level), "macro_f1_ci": _interval(f1[name], level)}
    for first, second in pairs:
        full_true = true[None, :]
        pa, pb = _encode(predictions[first]), _encode(predictions[second])
        d_acc = acc[second] - acc[first]
        d_f1 = f1[second] - f1[first]
        out["pairs"].append({
            "reference": first,
            "model": second,
            "accuracy_diff": float(np.mean(pb == true) - np.mean(pa == true)),
            "accuracy_diff_ci": _interval(d_acc, level),
            "macro_f1_diff": float(_macro_f1_rows(full_true, pb[None, :])[0] - _macro_f1_rows(full_true, pa[None, :])[0]),
            "macro_f1_diff_ci": _interval(d_f1, level),
            # Share of resamples in which the model is not better than the reference: a rough
            # one-sided bootstrap p-value for "better".
            "p_not_better": float(np.mean(d_acc <= 0)),
            "both_right": int(np.sum((pa == true) & (pb == true))),
            "only_reference_right": int(np.sum((pa == true) & (pb != true))),
            "only_model_right": int(np.sum((pa != true) & (pb == true))),
            "both_wrong": int(np.sum((pa != true) & (pb != true))),
        })
    return out


# --- ROUGE-L ----------------------------------------------------------------------------------

_SCORER = None


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F-measure (Google's `rouge-score`, Porter stemming) of a prediction vs a reference."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORER.score(reference, prediction or "")["rougeL"].fmeasure)
