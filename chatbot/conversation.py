"""The chat app's pure logic: answers, panes, history -> OpenAI messages, stream accumulation,
metrics, rendering, model titles and vote records. No Gradio and no network here, so all of it
is unit-tested in milliseconds; `client.py` does the I/O and `app.py` the UI.

Times are `time.perf_counter()` seconds passed in by the caller (so tests control the clock);
wall-clock times appear only in vote records.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError
from medtune.training.prompts import user_message

# Answer states. `pending`: request sent, nothing back yet; `streaming`: text arriving;
# `done`: the model finished (stop or length); `blocked`: a guardrail answered instead
# (finish_reason "content_filter"); `error`: the endpoint failed; `stopped`: the user pressed Stop.
PENDING, STREAMING, DONE, BLOCKED, ERROR, STOPPED = "pending", "streaming", "done", "blocked", "error", "stopped"
RUNNING = (PENDING, STREAMING)

LEFT, RIGHT = "left", "right"
SIDES = (LEFT, RIGHT)

# Vote value -> button label. The values are what the JSONL records hold.
VOTES = {
    "left": "Left is better",
    "right": "Right is better",
    "tie": "Tie",
    "both_bad": "Both bad",
}
VOTE_SCHEMA = "medtune-chat-vote/1"


def _extra(obj: Any, name: str) -> Any:
    """A field the OpenAI types do not declare (the server's `medtune` extension), or None."""
    if isinstance(obj, dict):
        return obj.get(name)
    extra = getattr(obj, "model_extra", None)
    if extra and name in extra:
        return extra[name]
    return getattr(obj, name, None)


@dataclass(frozen=True)
class Metrics:
    """Latency figures of one answer. tokens_per_s counts from the request start (so it
    includes the time to first token); tokens come from the server's `usage` when it sent one,
    else they are the number of content chunks (`tokens_source` says which)."""

    ttft_s: float | None
    total_s: float | None
    tokens: int | None
    tokens_source: str  # "usage" | "chunks"
    tokens_per_s: float | None

    def as_dict(self) -> dict:
        return {
            "ttft_s": _round(self.ttft_s),
            "total_s": _round(self.total_s),
            "tokens": self.tokens,
            "tokens_source": self.tokens_source,
            "tokens_per_s": _round(self.tokens_per_s, 2),
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class Answer:
    """One model's answer to one user turn, built up chunk by chunk."""

    model: str  # the model id the request named
    text: str = ""
    status: str = PENDING
    finish_reason: str | None = None
    error: str | None = None
    guardrail: dict | None = None  # the server's medtune.guardrail block, when one applied
    served_model: str | None = None  # the `model` field the server answered with
    checkpoint: str | None = None  # the checkpoint that answered (the server's medtune.checkpoint)
    started: float | None = None
    first_token: float | None = None
    ended: float | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    chunks: int = 0  # chunks that carried content

    def start(self, now: float) -> None:
        self.started = now
        self.status = PENDING

    def feed(self, chunk: Any, now: float) -> None:
        """Add one streamed `ChatCompletionChunk` (the openai type): content, finish reason,
        usage (the final chunk when stream_options.include_usage) and the guardrail extension."""
        if self.status not in RUNNING:
            return  # stopped or failed: late chunks are ignored
        if self.served_model is None and getattr(chunk, "model", None):
            self.served_model = chunk.model
        for choice in getattr(chunk, "choices", None) or []:
            if getattr(choice, "index", 0) != 0:
                continue
            delta = getattr(choice, "delta", None)
            content = getattr(delta, "content", None) if delta is not None else None
            if content:
                self.text += content
                self.chunks += 1
                if self.first_token is None:
                    self.first_token = now
                self.status = STREAMING
            if getattr(choice, "finish_reason", None):
                self.finish_reason = choice.finish_reason
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.completion_tokens = getattr(usage, "completion_tokens", None)
            self.prompt_tokens = getattr(usage, "prompt_tokens", None)
        medtune = _extra(chunk, "medtune")
        if isinstance(medtune, dict):
            if isinstance(medtune.get("guardrail"), dict):
                self.guardrail = medtune["guardrail"]
            if isinstance(medtune.get("checkpoint"), str):
                self.checkpoint = medtune["checkpoint"]

    def finish(self, now: float) -> None:
        """The stream ended normally."""
        if self.status not in RUNNING:
            return
        self.ended = now
        self.status = BLOCKED if self.finish_reason == "content_filter" else DONE

    def fail(self, message: str, now: float) -> None:
        if self.status not in RUNNING:
            return
        self.ended = now
        self.error = message
        self.status = ERROR

    def stop(self, now: float) -> None:
        if self.status not in RUNNING:
            return
        self.ended = now
        self.status = STOPPED

    @property
    def running(self) -> bool:
        return self.status in RUNNING

    def metrics(self, now: float | None = None) -> Metrics:
        end = self.ended if self.ended is not None else now
        total = None if self.started is None or end is None else max(end - self.started, 0.0)
        ttft = None if self.started is None or self.first_token is None else self.first_token - self.started
        if self.completion_tokens is not None:
            tokens, source = self.completion_tokens, "usage"
        else:
            tokens, source = self.chunks, "chunks"
        rate = tokens / total if total and tokens else None
        return Metrics(ttft, total, tokens, source, rate)


@dataclass
class Turn:
    """A user message (as sent) and one model's answer to it."""

    question: str
    answer: Answer


@dataclass
class Pane:
    """One side of the app: its own conversation, sent back to its own model each turn."""

    label: str  # "Base model" / "Fine-tuned"
    model: str  # the id asked for on the command line ("base", "finetuned", or a concrete id)
    turns: list[Turn] = field(default_factory=list)


@dataclass
class Exchange:
    """The latest side-by-side exchange, awaiting a vote."""

    question: str
    answers: dict[str, Answer]
    models: dict[str, str]
    checkpoint: str | None
    system_prompt: str
    params: dict
    turn: int  # 1-based index of this exchange in the conversation
    time: str  # wall clock (UTC ISO) when it was sent


@dataclass
class Session:
    """Everything one browser session holds."""

    left: Pane
    right: Pane
    exchange: Exchange | None = None
    last_question: str | None = None
    last_sides: tuple[str, ...] = ()
    busy: bool = False
    stop_requested: bool = False
    models: dict[str, ModelInfo] = field(default_factory=dict)
    models_error: str | None = None

    def pane(self, side: str) -> Pane:
        return self.left if side == LEFT else self.right


def new_session(left_model: str = "base", right_model: str = "finetuned") -> Session:
    return Session(Pane("Base model", left_model), Pane("Fine-tuned", right_model))


# ---------------------------------------------------------------- history -> OpenAI messages

def content_text(content: Any) -> str:
    """Plain text of a message's content: a string, or a list of parts ({"type": "text",
    "text": ...} as OpenAI and Gradio 6's normalised Chatbot value use); other parts are skipped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or "" if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return ""


def history_to_messages(
    turns: list[Turn], question: str, system_prompt: str = "", max_turns: int | None = None
) -> list[dict]:
    """The OpenAI `messages` for a new user turn after `turns` in one pane.

    Only turns the model really answered are replayed (done, or stopped with some text): an
    error or a guardrail block is not something the model said, and replaying a blocked input
    would get every later turn blocked too. `max_turns` keeps the last N of those, so a long
    chat does not outgrow the model's context. An empty system prompt sends none, so the server
    applies each model's default (the fine-tune's training prompt).
    """
    messages: list[dict] = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    replay = [t for t in turns if t.answer.status in (DONE, STOPPED) and t.answer.text.strip()]
    if max_turns is not None:
        replay = replay[-max_turns:] if max_turns > 0 else []
    for turn in replay:
        messages.append({"role": "user", "content": turn.question})
        messages.append({"role": "assistant", "content": turn.answer.text})
    messages.append({"role": "user", "content": question})
    return messages


def chatbot_history_to_messages(history: list[dict], system_prompt: str = "") -> list[dict]:
    """The same for a Gradio Chatbot value (messages format, content a string or a list of
    parts): user and assistant turns in order, empty ones and other roles dropped."""
    messages: list[dict] = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    for message in history:
        role = message.get("role")
        text = content_text(message.get("content"))
        if role in ("user", "assistant") and text.strip():
            messages.append({"role": role, "content": text})
    return messages


def user_turn(question: str, context: str = "") -> str:
    """The user message: the question, and the context in the shape the fine-tune was trained
    on ("question\\n\\nContext:\\ncontext", from the training prompt format)."""
    return user_message(question, context or "")


# ---------------------------------------------------------------- rendering

WAITING = "_waiting for the first token…_"


def format_metrics(m: Metrics) -> str:
    parts = []
    if m.ttft_s is not None:
        parts.append(f"TTFT {m.ttft_s:.2f} s")
    if m.tokens_per_s is not None:
        unit = "tok/s" if m.tokens_source == "usage" else "chunks/s"
        parts.append(f"{m.tokens_per_s:.1f} {unit}")
    if m.tokens is not None and m.total_s is not None:
        unit = "tokens" if m.tokens_source == "usage" else "chunks (no usage reported)"
        parts.append(f"{m.tokens} {unit} in {m.total_s:.2f} s")
    return " · ".join(parts)


def guardrail_marker(answer: Answer) -> str:
    g = answer.guardrail or {}
    details = [str(g[k]) for k in ("category", "stage") if g.get(k)]
    what = "redacted" if g.get("action") == "redact" else "blocked"
    return f"🛡️ **{what.capitalize()} by guardrails**" + (f" ({', '.join(details)})" if details else "")


def render_answer(answer: Answer, now: float | None = None) -> str:
    """Markdown for an answer bubble: the text plus a status line (metrics, block, error)."""
    if answer.status == PENDING:
        return WAITING
    if answer.status == STREAMING:
        return answer.text + " ▌"
    footer = format_metrics(answer.metrics(now))
    if answer.status == BLOCKED:
        reason = (answer.guardrail or {}).get("reason")
        body = answer.text.strip() or "The guardrails withheld this answer."
        lines = [guardrail_marker(answer), "", body]
        if reason:
            lines += ["", f"_Reason: {reason}_"]
        return "\n".join(lines + (["", f"_{footer}_"] if footer else []))
    if answer.status == ERROR:
        head = f"{answer.text}\n\n" if answer.text else ""
        return f"{head}⚠️ **{answer.error}**"
    notes = []
    if (answer.guardrail or {}).get("action") == "redact":  # answered, with parts masked
        notes.append(guardrail_marker(answer).replace("**", ""))
    if answer.status == STOPPED:
        notes.append("⏹ stopped")
    elif answer.finish_reason == "length":
        notes.append("cut at max tokens")
    text = answer.text if answer.text.strip() else "_(empty answer)_"
    status = " · ".join(p for p in (*notes, footer) if p)
    return f"{text}\n\n_{status}_" if status else text


def render_pane(pane: Pane, now: float | None = None) -> list[dict]:
    """The Gradio Chatbot value (messages format) for a pane."""
    out: list[dict] = []
    for turn in pane.turns:
        out.append({"role": "user", "content": turn.question})
        out.append({"role": "assistant", "content": render_answer(turn.answer, now)})
    return out


# ---------------------------------------------------------------- /v1/models and titles

@dataclass(frozen=True)
class ModelInfo:
    """A /v1/models entry with the server's `medtune` extension (all optional)."""

    id: str
    kind: str | None = None
    checkpoint: str | None = None
    run_id: str | None = None
    step: int | None = None
    base_model: str | None = None
    created: Any = None

    @classmethod
    def parse(cls, obj: Any) -> ModelInfo:
        ext = _extra(obj, "medtune")
        ext = ext if isinstance(ext, dict) else {}
        model_id = obj.get("id") if isinstance(obj, dict) else obj.id
        step = ext.get("step")
        return cls(
            id=str(model_id),
            kind=ext.get("kind"),
            checkpoint=ext.get("checkpoint"),
            run_id=ext.get("run_id"),
            step=step if isinstance(step, int) and not isinstance(step, bool) else None,
            base_model=ext.get("base_model"),
            created=ext.get("created"),
        )


def resolve_model(requested: str, models: dict[str, ModelInfo]) -> tuple[str, ModelInfo | None]:
    """The id to send for a pane, and what is known about it. The `finetuned` alias is pinned to
    the concrete checkpoint id it points at when the server lists that id, so that the answer
    and the vote record name the same checkpoint even if training publishes a new one meanwhile."""
    info = models.get(requested)
    if info is not None and info.checkpoint and info.checkpoint != requested and info.checkpoint in models:
        pinned = models[info.checkpoint]
        return pinned.id, ModelInfo(
            id=pinned.id,
            kind=info.kind,
            checkpoint=info.checkpoint,
            run_id=pinned.run_id or info.run_id,
            step=pinned.step if pinned.step is not None else info.step,
            base_model=pinned.base_model or info.base_model,
            created=pinned.created or info.created,
        )
    return requested, info


def _step_of(checkpoint: str | None) -> int | None:
    if not checkpoint or "step_" not in checkpoint:
        return None
    digits = checkpoint.rsplit("step_", 1)[1]
    return int(digits) if digits.isdigit() else None


def format_title(pane: Pane, models: dict[str, ModelInfo], models_error: str | None = None) -> str:
    """Markdown title of a pane: its label, the model id and, for a checkpoint, its step."""
    send_id, info = resolve_model(pane.model, models)
    title = f"### {pane.label} · `{send_id}`"
    if info is None:
        if models_error:
            return f"{title}\n_model list unavailable: {models_error}_"
        if models:
            if pane.model == "finetuned":
                return f"{title}\n_no fine-tuned checkpoint published yet_"
            return f"{title}\n_not served by this endpoint (served: {', '.join(sorted(models))})_"
        return f"{title}\n_model list not loaded yet_"
    details = []
    step = info.step if info.step is not None else _step_of(info.checkpoint)
    if step is not None:
        details.append(f"step {step}")
    if info.run_id:
        details.append(f"run {info.run_id}")
    if info.base_model:
        details.append(f"base {Path(str(info.base_model)).name}")
    if not details and info.kind:
        details.append(info.kind)
    if models_error:  # keep what was known, and say it may be out of date
        details.append("⚠️ model list unavailable, last known shown")
    return title + (f"\n_{' · '.join(details)}_" if details else "")


def checkpoint_of(pane: Pane, models: dict[str, ModelInfo]) -> str | None:
    """The checkpoint (`<run_id>/step_N`) a pane's model resolves to, if it is one."""
    _send_id, info = resolve_model(pane.model, models)
    if info is None:
        return None
    return info.checkpoint or (info.id if info.kind == "checkpoint" else None)


# ---------------------------------------------------------------- votes

def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def vote_record(exchange: Exchange, vote: str, when: str | None = None) -> dict:
    """One JSONL line for the evaluation report (schema in chatbot/README.md)."""
    if vote not in VOTES:
        raise MedtuneError(f"unknown vote {vote!r}: expected one of {', '.join(VOTES)}")
    winner = {"left": exchange.models.get(LEFT), "right": exchange.models.get(RIGHT)}.get(vote)
    return {
        "schema": VOTE_SCHEMA,
        "time": when or utc_now(),
        "asked": exchange.time,
        "vote": vote,
        "winner": winner,
        "question": exchange.question,
        "answers": {side: exchange.answers[side].text for side in SIDES},
        "status": {side: exchange.answers[side].status for side in SIDES},
        "guardrail": {side: exchange.answers[side].guardrail for side in SIDES},
        "models": dict(exchange.models),
        "checkpoint": exchange.checkpoint,
        "turn": exchange.turn,
        "system_prompt": exchange.system_prompt,
        "params": dict(exchange.params),
        "latency": {side: exchange.answers[side].metrics().as_dict() for side in SIDES},
    }


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as one line: O_APPEND and a single write() (so concurrent writers,
    e.g. several app replicas on shared storage, never interleave inside a line), then fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):  # a regular file takes the whole write unless the disk is full
            raise OSError(f"{path}: short write ({written} of {len(line)} bytes); disk full?")
        os.fsync(fd)
    finally:
        os.close(fd)
