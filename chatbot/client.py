"""The chat app's side of the OpenAI endpoint: list models, stream answers, run one exchange.

`ChatClient` wraps the official `openai.AsyncOpenAI` client (streaming, `include_usage` for token
counts, no automatic retries: the next send is the retry). `run_exchange` sends one user turn to
each pane's model concurrently, yields after every change so the UI can redraw, honours Stop, and
turns every failure into a readable message on the pane it belongs to. No Gradio here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import openai

from medtune.chatbot.conversation import (
    ERROR,
    LEFT,
    RIGHT,
    Answer,
    Exchange,
    ModelInfo,
    Session,
    Turn,
    checkpoint_of,
    history_to_messages,
    resolve_model,
    utc_now,
)

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "http://127.0.0.1:8000/v1"
_POLL_S = 0.1  # how often a quiet stream checks for Stop
_COALESCE_S = 0.03  # redraw at most ~30 times a second, however fast tokens arrive


@dataclass
class Settings:
    """Generation settings of one send (the UI's controls)."""

    system_prompt: str = ""
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    max_history_turns: int | None = 10

    def params(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}


def _root_cause(err: BaseException) -> BaseException:
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


def _status_message(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    if isinstance(body, str) and body.strip():
        return body.strip()[:300]
    return err.message


def describe_error(err: BaseException, api_base: str, model: str, timeout_s: float, mid_stream: bool = False) -> str:
    """One readable sentence for a failed request: what happened and what to do. `mid_stream`:
    the response had started (a connection error then means it broke, not that it never came)."""
    try:
        import httpx2  # the HTTP library under openai 3; errors raised mid-stream are its own
        transport_timeout: tuple[type, ...] = (httpx2.TimeoutException,)
        transport_error: tuple[type, ...] = (httpx2.TransportError,)
    except ImportError:  # pragma: no cover - older openai on httpx
        transport_timeout, transport_error = (), ()
    if isinstance(err, openai.APITimeoutError) or isinstance(err, transport_timeout):
        return (f"No answer from the endpoint within {timeout_s:g} s ({api_base}): it may be overloaded. "
                "Send again to retry.")
    if isinstance(err, openai.APIConnectionError):
        cause = _root_cause(err)
        detail = str(cause) if cause is not err and str(cause) else err.message
        if mid_stream:
            return f"The connection to {api_base} broke mid-answer ({detail}). Send again to retry."
        return (f"Cannot reach the model endpoint at {api_base} ({detail}). "
                "Is `medtune serve` running? Send again to retry once it is up.")
    if isinstance(err, openai.APIStatusError):
        code, message = err.status_code, _status_message(err)
        hint = {
            401: "Set MEDTUNE_API_KEY to the server's key.",
            404: f"The endpoint does not serve `{model}`" + (
                " (no fine-tuned checkpoint published yet?)." if model == "finetuned"
                else " (the fine-tune may have just moved to a newer checkpoint: send again)." if "/" in model
                else "."),
            413: "The conversation is too long for the model: press Clear, or lower max tokens.",
            429: "The server's queue is full" + (
                f"; retry after {err.response.headers.get('retry-after')} s." if err.response.headers.get("retry-after")
                else "; retry shortly."),
            503: "The server is not ready yet (still loading the model?); send again in a moment.",
        }.get(code, "Send again to retry." if code >= 500 else "")
        return f"The endpoint answered HTTP {code}: {message}" + (f" {hint}" if hint else "")
    if isinstance(err, openai.APIError):  # an error event inside the stream
        return f"The endpoint reported an error mid-answer: {err.message}. Send again to retry."
    if isinstance(err, transport_error):
        return (f"The connection to {api_base} broke mid-answer ({type(err).__name__}: {err}). "
                "Send again to retry.")
    return f"Unexpected error talking to {api_base}: {type(err).__name__}: {err}"


class ChatClient:
    """One OpenAI client for the app. Create it inside the event loop that will use it."""

    def __init__(self, api_base: str = DEFAULT_API_BASE, api_key: str | None = None,
                 timeout_s: float = 120.0, connect_timeout_s: float = 5.0, models_timeout_s: float = 5.0):
        self.api_base = api_base.rstrip("/")
        self.timeout_s = timeout_s
        self._models_timeout = openai.Timeout(models_timeout_s, connect=connect_timeout_s)
        # openai insists on a key; a server without MEDTUNE_API_KEY ignores the header.
        self._client = openai.AsyncOpenAI(
            base_url=self.api_base,
            api_key=api_key or "unset",
            timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
            max_retries=0,
        )

    async def list_models(self) -> dict[str, ModelInfo]:
        page = await self._client.models.list(timeout=self._models_timeout)
        return {m.id: ModelInfo.parse(m) for m in page.data}

    async def stream_answer(self, answer: Answer, messages: list[dict], settings: Settings,
                            notify: Callable[[], None] = lambda: None) -> None:
        """Stream one answer into `answer`; never raises except on cancellation."""
        stream = None
        try:
            stream = await self._client.chat.completions.create(
                model=answer.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                **settings.params(),
            )
            try:
                async for chunk in stream:
                    answer.feed(chunk, time.perf_counter())
                    notify()
            finally:
                await stream.close()  # also what tells the server to stop generating on Stop
            if answer.finish_reason is None and answer.running:
                answer.fail("The answer stream ended without a finish reason (connection dropped?). "
                            "Send again to retry.", time.perf_counter())
            answer.finish(time.perf_counter())
        except asyncio.CancelledError:
            answer.stop(time.perf_counter())
            raise
        except Exception as err:  # the app must never crash on what the endpoint does
            log.info("request to %s for model %s failed: %r", self.api_base, answer.model, err)
            message = describe_error(err, self.api_base, answer.model, self.timeout_s, mid_stream=stream is not None)
            answer.fail(message, time.perf_counter())
        finally:
            notify()

    async def close(self) -> None:
        await self._client.close()


async def refresh_models(client: ChatClient, session: Session) -> None:
    """Re-read /v1/models into the session (the fine-tune may have moved to a new checkpoint).
    On failure the last known list is kept and the error shown in the titles."""
    try:
        session.models = await client.list_models()
        session.models_error = None
    except Exception as err:
        session.models_error = describe_error(err, client.api_base, "models", client.timeout_s)


async def run_exchange(client: ChatClient, session: Session, question: str, sides: Sequence[str],
                       settings: Settings) -> AsyncIterator[None]:
    """Send `question` to the panes in `sides` concurrently; yield after each change.

    Each pane sends its own history. Stop (session.stop_requested) ends both streams and keeps
    what arrived. A side-by-side exchange whose answers both came back becomes the one to vote on.
    """
    session.busy, session.stop_requested, session.exchange = True, False, None
    tasks: list[asyncio.Task] = []
    answers: dict[str, Answer] = {}
    try:
        await refresh_models(client, session)
        # Resolved now, with the model list the requests use: the vote names what answered.
        checkpoint = checkpoint_of(session.right, session.models) or checkpoint_of(session.left, session.models)
        changed = asyncio.Event()
        for side in sides:
            pane = session.pane(side)
            send_id, _info = resolve_model(pane.model, session.models)
            messages = history_to_messages(pane.turns, question, settings.system_prompt, settings.max_history_turns)
            answer = Answer(model=send_id)
            answer.start(time.perf_counter())
            pane.turns.append(Turn(question, answer))
            answers[side] = answer
            tasks.append(asyncio.create_task(client.stream_answer(answer, messages, settings, changed.set)))
        asked = utc_now()
        yield
        while not all(t.done() for t in tasks):
            try:
                await asyncio.wait_for(changed.wait(), _POLL_S)
            except asyncio.TimeoutError:
                pass
            if session.stop_requested:
                break
            if changed.is_set():
                changed.clear()
                yield
                await asyncio.sleep(_COALESCE_S)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for answer in answers.values():
            answer.stop(time.perf_counter())  # a no-op for answers that already finished
        session.busy, session.stop_requested = False, False
    session.last_question, session.last_sides = question, tuple(sides)
    if set(sides) == {LEFT, RIGHT} and all(a.status != ERROR for a in answers.values()):
        session.exchange = Exchange(
            question=question,
            answers=answers,
            models={side: answers[side].model for side in (LEFT, RIGHT)},
            # What the server says answered beats what /v1/models said a moment before.
            checkpoint=answers[RIGHT].checkpoint or answers[LEFT].checkpoint or checkpoint,
            system_prompt=settings.system_prompt,
            params=settings.params(),
            turn=len(session.right.turns),
            time=asked,
        )
    yield


def undo_last(session: Session) -> str | None:
    """Regenerate's first half: drop the last exchange's turns; return its question."""
    if session.busy or session.last_question is None:
        return None
    for side in session.last_sides:
        pane = session.pane(side)
        if pane.turns and pane.turns[-1].question == session.last_question:
            pane.turns.pop()
    session.exchange = None
    return session.last_question


def clear(session: Session, sides: Sequence[str] = (LEFT, RIGHT)) -> None:
    """Forget the conversation of the panes in `sides` (both: a fresh start)."""
    for side in sides:
        session.pane(side).turns.clear()
    session.exchange = None
    session.last_sides = tuple(s for s in session.last_sides if s not in sides)
    if not session.last_sides:
        session.last_question = None
