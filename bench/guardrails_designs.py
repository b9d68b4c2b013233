"""Classifier designs on the same held-out splits: the frozen encoder with a logistic head and kNN support
(shipped), the same with a word/character n-gram model averaged in, and a SetFit-style encoder fine-tuned
contrastively on the same bank.

    .venv/bin/python bench/guardrails_designs.py                # all three (SetFit: ~10 min on 2 cores; `pip install setfit`,
                                                                 # which is not a project dependency)
    .venv/bin/python bench/guardrails_designs.py --designs frozen,frozen+lexical

Split (grouped by source, nothing shared between fitting and scoring): the designs are fitted on the
bank without the rows of the earlier blind sets (ids `blind-`, `blind2-`, `blind3-`), and scored on
those rows plus the team eval set and the round-8 held-out sets (`eval/prompts.jsonl`, `blind4`,
`blind5`): 1,000+ prompts by five authors, none of them in the training rows. All of these are
development data for the policy (their misses shaped earlier rounds), which is why they choose the
design and do not report its figures; the fresh held-out sets do that (README, "Measured").

Threshold-free comparison: ROC AUC of P(harm) for harmful vs. safe prompts, and harmful recall at the
score that blocks 2% of benign and at the one that blocks 5% of sensitive-legitimate prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def load_split():
    from medtune.guardrails.classifier import load_exemplars
    from medtune.guardrails.config import SAFE_LABELS, load_policy
    from medtune.guardrails.evalset import HELDOUT, PROMPTS, load_rows

    policy = load_policy()
    bank = load_exemplars(policy.exemplars_path(), policy.categories)
    train = [e for e in bank if not e.id.startswith("blind")]
    test = [{"text": e.text, "label": "harmful" if e.label not in SAFE_LABELS else e.label} for e in bank
            if e.id.startswith("blind") and e.kind != "answer"]
    for path in (PROMPTS, *HELDOUT):
        test += [{"text": r["text"], "label": r["label"]} for r in load_rows(path)]
    return policy, train, test


def recall_at(scores, labels, label, share):
    import numpy as np

    s = np.array(scores)
    lab = np.array(labels)
    neg = np.sort(s[lab == label])
    thr = neg[int(np.ceil((1 - share) * len(neg))) - 1] if len(neg) else 1.0
    return float((s[lab == "harmful"] > thr).mean()), float(thr)


def score_design(name, encode, train, test, policy, lexical: bool = False):
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from medtune.guardrails.classifier import SAFE, split_chunks
    from medtune.guardrails.config import SAFE_LABELS

    t0 = time.perf_counter()
    E = encode([e.text for e in train])
    y = np.array([SAFE if e.label in SAFE_LABELS else e.label for e in train])
    clf = LogisticRegression(C=policy.classifier.C, max_iter=5000, class_weight="balanced").fit(E, y)
    harm_cols = [i for i, c in enumerate(clf.classes_) if c != SAFE]
    if lexical:  # a word and character n-gram model beside the embeddings: intent is often in a few words
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.pipeline import make_pipeline, make_union

        lex = make_pipeline(make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                                       TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True)),
                            LogisticRegression(C=8.0, max_iter=5000, class_weight="balanced"))
        lex.fit([e.text for e in train], y)
        lex_cols = [i for i, c in enumerate(lex.classes_) if c != SAFE]
    labels_tr = np.array([e.label for e in train])
    harm_tr = ~np.isin(labels_tr, list(SAFE_LABELS))
    k, kmin = policy.classifier.support_k or 7, policy.classifier.support_min
    scores = []
    for row in test:
        chunks = split_chunks(row["text"], policy.classifier.max_chunks)
        X = encode(chunks)
        p = clf.predict_proba(X)[:, harm_cols].sum(axis=1)
        if lexical:
            p = 0.5 * p + 0.5 * lex.predict_proba(chunks)[:, lex_cols].sum(axis=1)
        top = np.argsort(-(X @ E.T), axis=1)[:, :k]
        p = p * np.minimum(1.0, harm_tr[top].sum(axis=1) / kmin)
        scores.append(float(p.max()))
    labels = [r["label"] for r in test]
    auc = roc_auc_score([lab == "harmful" for lab in labels], scores)
    r_b, _ = recall_at(scores, labels, "benign", 0.02)
    r_s, _ = recall_at(scores, labels, "sensitive", 0.05)
    out = {"design": name, "auc": auc, "recall_at_2pct_benign": r_b, "recall_at_5pct_sensitive": r_s,
           "seconds": time.perf_counter() - t0}
    print(f"{name:28s} AUC {auc:.4f}   recall @2% benign FB {100 * r_b:5.1f}%   @5% sensitive FB {100 * r_s:5.1f}%"
          f"   ({out['seconds']:.0f}s)", flush=True)
    return out


def frozen_encoder(model_dir):
    import torch
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(str(model_dir), device="cpu", model_kwargs={"dtype": torch.float32})
    return lambda texts: m.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)


def setfit_encoder(model_dir, train, iterations: int, epochs: int):
    """Contrastive fine-tuning of the encoder on pairs from the bank (SetFit's first phase)."""
    from datasets import Dataset

    try:
        from setfit import SetFitModel, Trainer, TrainingArguments
    except ImportError:
        sys.exit("the setfit design needs the setfit package: .venv/bin/pip install setfit (or --designs frozen,frozen+lexical)")

    from medtune.guardrails.classifier import SAFE
    from medtune.guardrails.config import SAFE_LABELS

    ds = Dataset.from_dict({"text": [e.text for e in train],
                            "label": [SAFE if e.label in SAFE_LABELS else e.label for e in train]})
    model = SetFitModel.from_pretrained(str(model_dir))
    import tempfile

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="setfit-"), batch_size=32, num_epochs=epochs,
                             num_iterations=iterations, seed=0, show_progress_bar=True, end_to_end=False)
    t0 = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=ds).train()
    print(f"  setfit contrastive phase: {time.perf_counter() - t0:.0f}s", flush=True)
    body = model.model_body
    return lambda texts: body.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--designs", default="frozen,frozen+lexical,setfit")
    ap.add_argument("--iterations", type=int, default=2, help="SetFit pairs per exemplar (each a positive and a negative)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--json", default=str(REPO / "storage" / "bench" / "guardrails_designs.json"))
    args = ap.parse_args()
    import torch

    torch.manual_seed(0)
    from medtune.guardrails.classifier import _model_dir

    policy, train, test = load_split()
    print(f"fit on {len(train)} bank rows; scored on {len(test)} prompts "
          f"({sum(r['label'] == 'harmful' for r in test)} harmful, {sum(r['label'] == 'benign' for r in test)} benign, "
          f"{sum(r['label'] == 'sensitive' for r in test)} sensitive)")
    model_dir = _model_dir(policy.classifier.model)
    results = []
    for name in args.designs.split(","):
        if name == "frozen":
            results.append(score_design("frozen MiniLM + LR + kNN", frozen_encoder(model_dir), train, test, policy))
        elif name == "frozen+lexical":
            results.append(score_design("frozen MiniLM + LR + TF-IDF + kNN", frozen_encoder(model_dir), train, test,
                                        policy, lexical=True))
        elif name == "setfit":
            enc = setfit_encoder(model_dir, train, args.iterations, args.epochs)
            results.append(score_design("SetFit MiniLM + LR + kNN", enc, train, test, policy))
        else:
            sys.exit(f"unknown design {name!r}: frozen, frozen+lexical, setfit")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
