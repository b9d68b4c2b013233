"""PubMedQA evaluation, base vs fine-tuned: `run(EvalConfig) -> dict` (what `medtune eval pubmedqa` calls).

Order of work: check every argument, read the data and pick the test split, check the endpoint
(or load the models in process) and every model id, read the votes file; only then score. So an
unreachable endpoint, an unknown model id or a file without decisions fails in seconds.

Every model sees exactly the fine-tune's training conversation (medtune.training.prompts:
SYSTEM_PROMPT + user_message(question, context)).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from medtune import __version__
from medtune.errors import MedtuneError
from medtune.evaluation import scoring
from medtune.evaluation.backends import INPROCESS, Generation, Likelihood, make_backend
from medtune.training import prompts
from medtune.training.records import QARecord

log = logging.getLogger("medtune.eval")

MODES = ("likelihood", "generate", "both")


class EvalConfig(BaseModel):
    """Arguments of one evaluation (the CLI flags, one field each)."""

    model_config = ConfigDict(extra="forbid")

    api_base: str = Field(description=f"OpenAI-compatible base URL (http://127.0.0.1:8000/v1), or '{INPROCESS}'")
    models: list[str] = Field(default=["base", "finetuned"], description="model ids; the first is the reference")
    data: Path = Field(description="prepared JSONL (`medtune data prepare` output) with decisions")
    out: Path = Field(description="output directory for report.md, report.html, metrics.json")
    test_ids: Path | None = Field(default=None, description="ids of the test split (PubMedQA test_ground_truth.json)")
    test_split: float = Field(default=0.2, description="without --test-ids: stratified share held out, as `data build`")
    seed: int = Field(default=42, description="seed of the split (as `data build`), of --limit and of the samples")
    limit: int | None = Field(default=None, description="score a seeded random subset of this many test items")
    mode: Literal["likelihood", "generate", "both"] = Field(default="both", description="how decisions are read")
    max_tokens: int = Field(default=64, description="generate mode: tokens per answer")
    samples: int = Field(default=5, description="side-by-side samples in the report")
    sample_max_tokens: int = Field(default=160, description="tokens per side-by-side answer")
    bootstrap: int = Field(default=2000, description="bootstrap resamples for the 95% intervals")
    concurrency: int = Field(default=4, description="HTTP requests in flight")
    timeout: float = Field(default=120.0, description="HTTP timeout per request, seconds")
    storage: Path | None = Field(default=None, description="checkpoint storage (in-process models, training log)")
    base_model: Path | None = Field(default=None, description="in-process: base model directory")
    checkpoint: Path | None = Field(default=None, description="in-process: checkpoint for 'finetuned'")
    dtype: Literal["float32", "bf16"] = Field(default="float32", description="in-process weights dtype")
    metrics: Path | None = Field(default=None, description="training metrics.jsonl (default: the checkpoint's run)")
    votes: Path | None = Field(default=None, description="the chatbot's votes file (JSONL)")


def validate_config(cfg: EvalConfig) -> None:
    """Collect every problem with the arguments and raise once."""
    problems = []
    if not cfg.models:
        problems.append("--models is empty; e.g. --models base,finetuned")
    dupes = [m for m, n in Counter(cfg.models).items() if n > 1]
    if dupes:
        problems.append(f"--models lists {', '.join(dupes)} twice")
    if not cfg.data.is_file():
        problems.append(f"--data {cfg.data}: file not found (create it with `medtune data prepare`)")
    if cfg.test_ids is not None and not cfg.test_ids.is_file():
        problems.append(f"--test-ids {cfg.test_ids}: file not found")
    if cfg.test_ids is None and not 0.0 < cfg.test_split < 1.0:
        problems.append(f"--test-split {cfg.test_split} must be in (0, 1), e.g. 0.2")
    if cfg.limit is not None and cfg.limit < 1:
        problems.append(f"--limit {cfg.limit} must be >= 1")
    for name in ("max_tokens", "sample_max_tokens", "concurrency"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 1")
    if cfg.samples < 0:
        problems.append(f"--samples {cfg.samples} must be >= 0")
    if cfg.bootstrap < 100:
        problems.append(f"--bootstrap {cfg.bootstrap} is too few resamples for a 95% interval; use 1000 or more")
    if cfg.timeout <= 0:
        problems.append(f"--timeout {cfg.timeout} must be > 0")
    for flag, path in (("--metrics", cfg.metrics), ("--votes", cfg.votes)):
        if path is not None and not path.is_file():
            problems.append(f"{flag} {path}: file not found")
    if cfg.base_model is not None and not cfg.base_model.is_dir():
        problems.append(f"--base-model {cfg.base_model}: no such directory")
    if cfg.checkpoint is not None and not cfg.checkpoint.is_dir():
        problems.append(f"--checkpoint {cfg.checkpoint}: no such directory")
    if cfg.out.exists() and not cfg.out.is_dir():
        problems.append(f"--out {cfg.out}: exists and is not a directory")
    if not cfg.api_base.strip():
        problems.append(f"--api-base is empty; e.g. http://127.0.0.1:8000/v1 or {INPROCESS}")
    elif cfg.api_base.strip().lower() != INPROCESS and "://" not in cfg.api_base:
        problems.append(f"--api-base {cfg.api_base!r}: expected a URL such as http://127.0.0.1:8000/v1, or {INPROCESS}")
    if problems:
        raise MedtuneError("invalid arguments:\n  " + "\n  ".join(problems))


def select_items(cfg: EvalConfig) -> tuple[list[QARecord], dict]:
    """The labelled test items to score, and how they were chosen (for the report)."""
    from medtune.training.build import read_test_ids, split_records
    from medtune.training.records import read_records

    records = read_records(cfg.data)
    labelled = sum(r.decision is not None for r in records)
    if labelled == 0:
        raise MedtuneError(
            f"--data {cfg.data}: none of its {len(records)} records has a decision (yes/no/maybe), so there is "
            "nothing to score; use labelled data such as PubMedQA PQA-L (ori_pqal.json) through `medtune data prepare`"
        )
    info: dict = {"path": str(cfg.data), "sha256": _sha256(cfg.data), "records": len(records), "labelled": labelled}
    if cfg.test_ids is not None:
        ids = read_test_ids(cfg.test_ids)
        test = [r for r in records if r.id in ids]
        missing = len(ids) - len(test)
        info["split"] = {"how": "test ids", "file": str(cfg.test_ids), "ids": len(ids), "found": len(test), "missing": missing}
        if not test:
            raise MedtuneError(f"--test-ids {cfg.test_ids}: none of its {len(ids)} ids occur in {cfg.data}; "
                               "is it the test split of this dataset?")
        if missing:
            log.warning("--test-ids: %d of %d ids are not in %s; scoring the %d found", missing, len(ids), cfg.data, len(test))
    else:
        # Exactly `medtune data build`'s split (same function, same seed and share), so the
        # evaluation's test items are the ones training held out.
        _train, test = split_records(records, cfg.test_split, cfg.seed)
        order = {r.id: i for i, r in enumerate(records)}
        test.sort(key=lambda r: order[r.id])
        info["split"] = {"how": "seeded stratified split (as `medtune data build`)", "test_split": cfg.test_split,
                         "seed": cfg.seed, "test": len(test)}
    unlabelled = [r for r in test if r.decision is None]
    test = [r for r in test if r.decision is not None]
    info["split"]["unlabelled_skipped"] = len(unlabelled)
    if not test:
        raise MedtuneError(f"--data {cfg.data}: the test split holds no item with a decision")
    if cfg.limit is not None and cfg.limit < len(test):
        keep = sorted(random.Random(cfg.seed).sample(range(len(test)), cfg.limit))
        test = [test[i] for i in keep]
        info["limit"] = cfg.limit
    info["items"] = len(test)
    info["decisions"] = {d: sum(r.decision == d for r in test) for d in scoring.LABELS}
    return test, info


def _sha256(path: Path) -> str:
    from medtune.fileio import sha256_file

    return sha256_file(path)


def messages_for(rec: QARecord) -> list[dict]:
    """The fine-tune's training conversation, without the answer."""
    return prompts.chat_messages(rec.question, rec.context)


def _map(fn, items: list, desc: str, concurrency: int) -> tuple[list, float]:
    """fn over items (threads for HTTP), in order, with a progress bar; returns results and seconds."""
    from tqdm import tqdm

    start = time.perf_counter()
    results: list = [None] * len(items)
    with tqdm(total=len(items), desc=desc, unit="item", mininterval=1.0, dynamic_ncols=True) as bar:
        if concurrency <= 1:
            for i, item in enumerate(items):
                results[i] = fn(item)
                bar.update()
        else:
            pool = ThreadPoolExecutor(max_workers=concurrency)
            try:
                futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
            except BaseException:
                # A failure (endpoint gone, Ctrl-C) stops the queued requests, not just this loop.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown()
    return results, time.perf_counter() - start


def _training_log(cfg: EvalConfig, infos: dict) -> Path | None:
    """The run's metrics.jsonl: --metrics, else the first fine-tuned model's run in the storage."""
    from medtune.training.checkpoints import storage_root

    if cfg.metrics is not None:
        return cfg.metrics
    storage = storage_root(cfg.storage)
    for info in infos.values():
        if info.path:  # in process: the checkpoint directory itself
            candidate = Path(info.path).parent / "metrics.jsonl"
        elif info.run_id:
            candidate = storage / "runs" / info.run_id / "metrics.jsonl"
        elif info.checkpoint and "/" in info.checkpoint:
            candidate = storage / "runs" / info.checkpoint.split("/")[0] / "metrics.jsonl"
        else:
            continue
        if candidate.is_file():
            return candidate
    return None


def run(cfg: EvalConfig) -> dict:
    """Evaluate; write report.md, report.html, metrics.json and predictions.jsonl into cfg.out."""
    from medtune.evaluation import report, summaries
    from medtune.training.checkpoints import storage_root

    started = time.perf_counter()
    validate_config(cfg)
    items, data_info = select_items(cfg)
    votes = summaries.read_votes(cfg.votes) if cfg.votes else None
    modes = ["likelihood", "generate"] if cfg.mode == "both" else [cfg.mode]
    log.info("%d test items (%s), models %s, mode %s", len(items), data_info["split"]["how"], ",".join(cfg.models), cfg.mode)

    backend = make_backend(cfg.api_base, storage=storage_root(cfg.storage), base_model=cfg.base_model,
                           checkpoint=cfg.checkpoint, dtype=cfg.dtype, timeout=cfg.timeout, concurrency=cfg.concurrency)
    timing: dict = {}
    t0 = time.perf_counter()
    infos = backend.preflight(cfg.models)
    timing["preflight_s"] = time.perf_counter() - t0
    cfg.out.mkdir(parents=True, exist_ok=True)

    truth = [r.decision for r in items]
    pairs = [(cfg.models[0], m) for m in cfg.models[1:]]
    results: dict = {}
    rows: list[dict] = []
    try:
        for mode in modes:
            per_model, preds_of = {}, {}
            for name in cfg.models:
                if mode == "likelihood":
                    outs, secs = _map(lambda r, n=name: backend.likelihood(n, messages_for(r)), items,
                                      f"likelihood {name}", backend.concurrency)
                    preds = [scoring.pick_option(o.logprobs) for o in outs]
                else:
                    outs, secs = _map(lambda r, n=name: backend.generate(n, messages_for(r), cfg.max_tokens), items,
                                      f"generate {name}", backend.concurrency)
                    preds = [scoring.parse_decision(o.text) if o.note is None else None for o in outs]
                per_model[name] = _model_result(mode, truth, preds, outs, secs)
                preds_of[name] = preds
                log.info("%s %s: accuracy %.3f, %d items in %.1f s (%.2f items/s)", mode, name,
                         per_model[name]["accuracy"], len(items), secs, len(items) / max(secs, 1e-9))
                rows += [_row(mode, name, rec, pred, out) for rec, pred, out in zip(items, preds, outs)]
            boot = scoring.bootstrap(truth, preds_of, pairs, resamples=cfg.bootstrap, seed=cfg.seed)
            for name, ci in boot["models"].items():
                per_model[name].update(ci)
            results[mode] = {"models": per_model, "comparisons": boot["pairs"],
                             "bootstrap": {"resamples": boot["resamples"], "level": boot["level"], "seed": boot["seed"]}}
        t0 = time.perf_counter()
        samples = _samples(backend, items, cfg)
        timing["samples_s"] = time.perf_counter() - t0
    finally:
        backend.close()

    metrics_path = _training_log(cfg, infos)
    training = summaries.read_training_metrics(metrics_path) if metrics_path else None
    timing["total_s"] = time.perf_counter() - started
    timing["scoring"] = {mode: {name: {"seconds": r["seconds"], "items_per_s": r["items_per_s"]}
                                for name, r in results[mode]["models"].items()} for mode in modes}
    result = {
        "format": "medtune-eval/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "medtune_version": __version__,
        "task": "pubmedqa",
        "endpoint": INPROCESS if backend.kind == INPROCESS else backend.api_base,
        "backend": backend.kind,
        "method": {mode: backend.method[mode] for mode in modes},
        "prompt": {"system": prompts.SYSTEM_PROMPT, "user": "question + '\\n\\nContext:\\n' + context"},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.model_dump().items()},
        "data": data_info,
        "models": {name: asdict(info) for name, info in infos.items()},
        "reference_model": cfg.models[0],
        "results": results,
        "samples": samples,
        "training": training,
        "votes": votes,
        "timing": timing,
    }
    paths = report.write_all(result, rows, cfg.out)
    result["files"] = {k: str(v) for k, v in paths.items()}
    return result


def _model_result(mode: str, truth: list[str], preds: list[str | None], outs: list, secs: float) -> dict:
    res = scoring.classification_metrics(truth, preds)
    notes = Counter(_note_kind(o.note) for o in outs if o.note)
    res["seconds"] = secs
    res["items_per_s"] = len(truth) / secs if secs > 0 else None
    res["predicted"] = {label: sum(p == label for p in preds) for label in scoring.LABELS}
    if mode == "likelihood":
        res["unscored"] = sum(p is None for p in preds)
    else:
        res["unparseable"] = sum(p is None and o.note is None for p, o in zip(preds, outs))
        res["finish_length"] = sum(o.finish_reason == "length" for o in outs)
    res["blocked"] = notes.get("blocked", 0)
    res["errors"] = notes.get("error", 0)
    return res


def _note_kind(note: str) -> str:
    return "blocked" if note == "blocked" else "error" if note.startswith(("error", "prompt too long")) else "other"


def _row(mode: str, model: str, rec: QARecord, pred: str | None, out) -> dict:
    row = {"mode": mode, "model": model, "id": rec.id, "decision": rec.decision, "prediction": pred,
           "correct": pred == rec.decision}
    if isinstance(out, Likelihood):
        row["logprobs"] = out.logprobs
    elif isinstance(out, Generation):
        row["text"] = out.text
        row["finish_reason"] = out.finish_reason
    if out.note:
        row["note"] = out.note
    return row


def _samples(backend, items: list[QARecord], cfg: EvalConfig) -> list[dict]:
    """N seeded test questions answered by every model, each answer with ROUGE-L vs the reference."""
    if cfg.samples == 0:
        return []
    chosen = sorted(random.Random(cfg.seed + 1).sample(range(len(items)), min(cfg.samples, len(items))))
    picked = [items[i] for i in chosen]
    answers = {}
    for name in cfg.models:
        outs, _secs = _map(lambda r, n=name: backend.generate(n, messages_for(r), cfg.sample_max_tokens), picked,
                           f"samples {name}", backend.concurrency)
        answers[name] = outs
    samples = []
    for k, rec in enumerate(picked):
        reference = prompts.answer_text(rec.answer, rec.decision)
        entry = {"id": rec.id, "question": rec.question, "context": rec.context, "decision": rec.decision,
                 "reference": reference, "answers": {}}
        for name in cfg.models:
            out = answers[name][k]
            entry["answers"][name] = {
                "text": out.text, "finish_reason": out.finish_reason, "note": out.note,
                "decision": scoring.parse_decision(out.text), "rouge_l": scoring.rouge_l(reference, out.text),
            }
        samples.append(entry)
    return samples
