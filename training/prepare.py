"""`medtune data prepare`: turn a PubMedQA-style source into the prepared JSONL format.

    medtune data prepare --source ori_pqal.json --output storage/datasets/pqal.jsonl
    medtune data prepare --source hf:qiaojin/PubMedQA:pqa_artificial --output pqa_a.jsonl --limit 5000

Accepted sources (detected from the file and from each record's fields):
  * the original PubMedQA JSON: {pmid: {QUESTION, CONTEXTS, LONG_ANSWER, final_decision, ...}}
  * a Hugging Face export of qiaojin/PubMedQA (JSONL, JSON list or parquet rows with
    pubid, question, context{contexts}, long_answer, final_decision)
  * the seed project's JSONL ({"question", "context", "answer"}) and this project's own output
  * a hub dataset, `hf:NAME[:CONFIG[:SPLIT]]` (needs internet access)

Output: one JSON object per line with id, question, context, answer, decision. The output is
written to a temporary file and renamed into place, so a failed run never leaves a half file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from medtune.errors import MedtuneError
from medtune.fileio import atomic_write
from medtune.training.records import DECISIONS, QARecord, Row, describe_validation_error, iter_jsonl

log = logging.getLogger("medtune.data.prepare")

MAX_REPORTED_SKIPS = 20


@dataclass
class PrepareSummary:
    source: str
    output: str
    read: int = 0
    written: int = 0
    skipped_bad: int = 0
    duplicates: int = 0
    decisions: Counter = field(default_factory=Counter)

    def format(self) -> str:
        hist = ", ".join(f"{d}={self.decisions.get(d, 0)}" for d in (*DECISIONS, None))
        hist = hist.replace("None=", "none=")
        return (
            f"prepared {self.output}\n"
            f"  source:     {self.source}\n"
            f"  read:       {self.read}\n"
            f"  written:    {self.written}\n"
            f"  skipped:    {self.skipped_bad} bad, {self.duplicates} duplicate ids\n"
            f"  decisions:  {hist}"
        )


# --------------------------------------------------------------------------- reading sources


def _rows_from_json(path: Path) -> Iterator[Row]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        line_start = data.rfind(b"\n", 0, err.start) + 1
        raise MedtuneError(
            f"{path}:{line}: bytes are not valid UTF-8 (byte 0x{data[err.start]:02x} at column "
            f"{err.start - line_start + 1}); re-save the file as UTF-8"
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        ends_open = not text.rstrip().endswith(("}", "]"))
        hint = "the file looks truncated (it ends before its closing bracket)" if ends_open else "fix the JSON syntax"
        raise MedtuneError(
            f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg}); {hint}, or re-export the file"
        ) from None
    if isinstance(obj, dict):
        # PubMedQA's own layout: {pmid: {...}}; the key is the id.
        for key, value in obj.items():
            yield Row(where=f"{path}: record {key!r}", raw=value, key=str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield Row(where=f"{path}: record #{i}", raw=value)
    else:
        raise MedtuneError(f"{path}: expected a JSON object of records or a list of records, got {type(obj).__name__}")


def _rows_from_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise MedtuneError(f"{path}: not a readable parquet file ({err})") from None
    i = 0
    for batch in pfile.iter_batches(batch_size=2048):
        for value in batch.to_pylist():
            yield Row(where=f"{path}: row {i}", raw=value)
            i += 1


def _rows_from_hub(spec: str) -> Iterator[Row]:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise MedtuneError(f"bad hub source {spec!r}: use hf:NAME[:CONFIG[:SPLIT]], e.g. hf:qiaojin/PubMedQA:pqa_labeled")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:
        raise MedtuneError(
            f"could not load hub dataset {name!r} (config {config!r}, split {split!r}): {err}. "
            "This needs internet access (and HF_TOKEN for gated data); otherwise download an export and pass the file"
        ) from None
    for i, value in enumerate(ds):
        yield Row(where=f"{spec}: row {i}", raw=value)


def iter_source(source: str) -> Iterator[Row]:
    if source.startswith("hf:"):
        return _rows_from_hub(source)
    path = Path(source)
    if not path.exists():
        raise MedtuneError(f"source not found: {path} (pass a PubMedQA JSON/JSONL/parquet file or hf:NAME)")
    if not path.is_file():
        raise MedtuneError(f"source is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _rows_from_parquet(path)
    if suffix == ".json":
        return _rows_from_json(path)
    return iter_jsonl(path)


# --------------------------------------------------------------------------- normalising


def _join(value) -> str:
    """Contexts arrive as a list of paragraphs; keep them apart with newlines, never glued."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # HF export: {"contexts": [...], "labels": [...], ...}
        return _join(value.get("contexts"))
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v).strip() for v in value if str(v).strip())
    return str(value)


def _content_id(question: str, context: str) -> str:
    digest = hashlib.sha1(f"{question.strip()}\n{context.strip()}".encode()).hexdigest()
    return f"q-{digest[:12]}"


def normalise(row: Row) -> QARecord:
    """Map one raw record of any accepted shape to a `QARecord`, or raise `MedtuneError`."""
    raw = row.raw
    if not isinstance(raw, dict):
        raise MedtuneError(f"{row.where}: expected a JSON object, got {type(raw).__name__}")
    if "QUESTION" in raw:  # original PubMedQA (ori_pqal.json)
        fields = {
            "id": row.key or raw.get("pmid") or raw.get("PMID"),
            "question": raw.get("QUESTION"),
            "context": _join(raw.get("CONTEXTS")),
            "answer": raw.get("LONG_ANSWER"),
            "decision": raw.get("final_decision"),
        }
    elif "pubid" in raw or "long_answer" in raw:  # HF export of qiaojin/PubMedQA
        fields = {
            "id": raw.get("pubid", row.key),
            "question": raw.get("question"),
            "context": _join(raw.get("context")),
            "answer": raw.get("long_answer"),
            "decision": raw.get("final_decision"),
        }
    elif "question" in raw:  # the seed's JSONL, or this project's own prepared output
        extra = sorted(set(raw) - {"id", "question", "context", "answer", "decision"})
        if extra:
            raise MedtuneError(
                f"{row.where}: unexpected field(s) {', '.join(extra)}; "
                "expected id, question, context, answer, decision"
            )
        question = raw.get("question")
        context = _join(raw.get("context"))
        rid = raw.get("id", row.key)
        if rid is None and isinstance(question, str):
            rid = _content_id(question, context)
        fields = {
            "id": rid,
            "question": question,
            "context": context,
            "answer": raw.get("answer"),
            "decision": raw.get("decision"),
        }
    else:
        keys = ", ".join(sorted(map(str, raw))[:8]) or "none"
        raise MedtuneError(
            f"{row.where}: unrecognised record (fields: {keys}); expected PubMedQA (QUESTION, LONG_ANSWER, "
            "final_decision), its HF export (pubid, question, context, long_answer, final_decision) or "
            "question/context/answer"
        )
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        return QARecord.model_validate(fields)
    except ValidationError as err:
        raise MedtuneError(f"{row.where}: {describe_validation_error(err)}") from None


# --------------------------------------------------------------------------- the stage


def prepare(
    source: str,
    output: str | Path,
    limit: int | None = None,
    skip_bad_lines: bool = False,
) -> PrepareSummary:
    """Convert `source` into prepared JSONL at `output`; returns counts. Raises `MedtuneError`."""
    if limit is not None and limit < 1:
        raise MedtuneError(f"--limit must be a positive number of records, got {limit}")
    output = Path(output)
    summary = PrepareSummary(source=source, output=str(output))
    seen: set[str] = set()
    rows: Iterable[Row] = iter_source(source)
    with atomic_write(output) as out:
        for row in tqdm(rows, desc="prepare", unit="rec", disable=None, mininterval=2.0):
            if limit is not None and summary.written >= limit:
                break
            summary.read += 1
            try:
                if row.error is not None:
                    raise MedtuneError(f"{row.where}: {row.error}")
                rec = normalise(row)
            except MedtuneError as err:
                if not skip_bad_lines:
                    raise MedtuneError(
                        f"{err}\n(nothing was written to {output}; fix the record, or pass --skip-bad-lines "
                        "to skip bad records and count them)"
                    ) from None
                summary.skipped_bad += 1
                if summary.skipped_bad <= MAX_REPORTED_SKIPS:
                    log.warning("skipping bad record: %s", err)
                continue
            if rec.id in seen:
                summary.duplicates += 1
                continue
            seen.add(rec.id)
            out.write(json.dumps(rec.model_dump(), ensure_ascii=False) + "\n")
            summary.written += 1
            summary.decisions[rec.decision] += 1
        if summary.written == 0:
            raise MedtuneError(f"{source}: no usable records found; nothing was written to {output}")
    if summary.skipped_bad > MAX_REPORTED_SKIPS:
        log.warning("... %d more bad records skipped", summary.skipped_bad - MAX_REPORTED_SKIPS)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="PubMedQA JSON, HF-export JSONL/parquet, seed JSONL, or hf:NAME[:CONFIG[:SPLIT]]")
    parser.add_argument("--output", required=True, help="prepared JSONL to write (replaced atomically)")
    parser.add_argument("--limit", type=int, default=None, help="stop after writing N records")
    parser.add_argument("--skip-bad-lines", "--skip_bad_lines", action="store_true",
                        help="skip records that fail validation (each is logged and counted) instead of stopping")


def run_from_args(args: argparse.Namespace) -> int:
    summary = prepare(args.source, args.output, limit=args.limit, skip_bad_lines=args.skip_bad_lines)
    print(summary.format())
    return 0
