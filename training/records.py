"""The prepared-dataset record: one JSON object per line with id, question, context, answer, decision.

`medtune data prepare` writes this shape; `medtune data build`, training and evaluation read it.
Reading is strict and reports `file:line` with the field at fault, because a silently skipped or
mangled line here becomes a silently worse model three stages later.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medtune.errors import MedtuneError

Decision = Literal["yes", "no", "maybe"]
DECISIONS: tuple[str, ...] = ("yes", "no", "maybe")


class QARecord(BaseModel):
    """One question-answer item in the prepared format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="Stable unique id (PubMed id for PubMedQA).")
    question: str = Field(min_length=1, description="The question, one line.")
    context: str = Field(default="", description="Supporting text (abstract); paragraphs separated by newlines.")
    answer: str = Field(min_length=1, description="The reference long answer.")
    decision: Decision | None = Field(default=None, description="yes / no / maybe, or null when unknown.")

    @field_validator("id", "question", "context", "answer", mode="before")
    @classmethod
    def _strip(cls, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        return value.strip() if isinstance(value, str) else value

    @field_validator("decision", mode="before")
    @classmethod
    def _normalise_decision(cls, value):
        if value is None:
            return None
        if isinstance(value, str):
            text = value.strip().lower()
            return None if text == "" else text
        return value


def describe_validation_error(err: ValidationError) -> str:
    """Turn pydantic's error list into one readable line per field ("answer: missing")."""
    parts = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "record"
        if item["type"] == "missing":
            parts.append(f"'{field}' is missing")
        elif item["type"] in ("literal_error", "enum"):
            parts.append(f"'{field}' is {item.get('input')!r}, expected one of yes/no/maybe or null")
        elif item["type"] == "string_too_short":
            parts.append(f"'{field}' is empty")
        elif item["type"] == "extra_forbidden":
            parts.append(f"unexpected field '{field}'")
        else:
            parts.append(f"'{field}': {item['msg']}")
    return "; ".join(parts)


@dataclass
class Row:
    """A raw source record with where it came from, or the reason it could not be parsed."""

    where: str  # "path:line", "path: record 'key'", "path: row 7"
    raw: object = None
    error: str | None = None
    key: str | None = None  # the id given by the container (PubMedQA JSON keys)


def utf8_error(raw: bytes, err: UnicodeDecodeError) -> str:
    return (
        f"bytes are not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
        "re-save the file as UTF-8"
    )


def iter_jsonl(path: Path) -> Iterator[Row]:
    """Yield one `Row` per non-blank line of a JSON Lines file; bad lines carry an error, not a raise."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield Row(where, error=utf8_error(raw, err))
                continue
            if not text.strip():
                continue
            try:
                yield Row(where, raw=json.loads(text.rstrip("\r\n")))
            except json.JSONDecodeError as err:
                yield Row(
                    where,
                    error=f"invalid JSON at column {err.colno} ({err.msg}); each line must be one complete JSON object",
                )


def read_records(path: str | Path) -> list[QARecord]:
    """Read a prepared JSONL file strictly; any bad line raises `MedtuneError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise MedtuneError(f"dataset file not found: {path} (create it with `medtune data prepare`)")
    records: list[QARecord] = []
    seen: dict[str, str] = {}
    for item in iter_jsonl(path):
        if item.error is not None:
            raise MedtuneError(f"{item.where}: {item.error}")
        if not isinstance(item.raw, dict):
            raise MedtuneError(f"{item.where}: expected a JSON object, got {type(item.raw).__name__}")
        try:
            rec = QARecord.model_validate(item.raw)
        except ValidationError as err:
            raise MedtuneError(f"{item.where}: {describe_validation_error(err)}") from None
        if rec.id in seen:
            raise MedtuneError(
                f"{item.where}: duplicate id {rec.id!r} (first at {seen[rec.id]}); "
                "run `medtune data prepare` on the file to drop duplicates"
            )
        seen[rec.id] = item.where
        records.append(rec)
    if not records:
        raise MedtuneError(f"{path}: no records (the file is empty)")
    return records
