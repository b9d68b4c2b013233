"""Chat app: pure logic (history -> messages, stream accumulation, metrics, titles, votes), the
client against a small fake OpenAI server (errors, guardrail blocks, Stop, recovery), the CLI
settings, and the Gradio wiring through gradio_client. The browser test against a live
`medtune serve` is tests/test_chatbot_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletionChunk

from medtune.chatbot import cli as chat_cli
from medtune.chatbot.client import ChatClient, Settings, clear, run_exchange, undo_last
from medtune.chatbot.conversation import (
    BLOCKED,
    DONE,
    ERROR,
    LEFT,
    RIGHT,
    STOPPED,
    VOTE_SCHEMA,
    Answer,
    Exchange,
    ModelInfo,
    Pane,
    Turn,
    chatbot_history_to_messages,
    format_metrics,
    format_title,
    history_to_messages,
    new_session,
    render_answer,
    render_pane,
    resolve_model,
    user_turn,
    vote_record,
)
from medtune.errors import MedtuneError

from conftest import REPO

CKPT = "run-1/step_000007"


# ---------------------------------------------------------------- helpers

def chunk(content=None, finish=None, usage=None, model="m", **extra) -> ChatCompletionChunk:
    """A real openai ChatCompletionChunk, parsed from the wire shape (extra fields kept)."""
    data = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [], **extra}
    if content is not None or finish is not None:
        data["choices"] = [{"index": 0, "delta": {"content": content} if content is not None else {},
                            "finish_reason": finish}]
    if usage is not None:
        data["usage"] = {"prompt_tokens": 3, "completion_tokens": usage, "total_tokens": 3 + usage}
    return ChatCompletionChunk.model_validate(data)


def done_answer(text: str, status: str = DONE, model: str = "m") -> Answer:
    answer = Answer(model=model, text=text, status=status)
    answer.started, answer.ended = 0.0, 1.0
    return answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- history -> OpenAI messages

def test_history_replays_only_what_the_model_said_with_system_prompt():
    turns = [
        Turn("q1", done_answer("a1")),
        Turn("q2", done_answer("", status=ERROR)),
        Turn("q3", done_answer("Sorry, I can't help with that.", status=BLOCKED)),
        Turn("q4", done_answer("partial", status=STOPPED)),
    ]
    messages = history_to_messages(turns, "q5", system_prompt="  Be brief.  ")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q4"},
        {"role": "assistant", "content": "partial"},
        {"role": "user", "content": "q5"},
    ]
    # No system prompt: none is sent, so the server applies each model's own default.
    assert history_to_messages([], "hi", system_prompt="   ") == [{"role": "user", "content": "hi"}]


def test_history_keeps_the_last_n_answered_turns():
    turns = [Turn(f"q{i}", done_answer(f"a{i}")) for i in range(5)]
    got = history_to_messages(turns, "next", max_turns=2)
    assert [m["content"] for m in got] == ["q3", "a3", "q4", "a4", "next"]
    assert history_to_messages(turns, "next", max_turns=0) == [{"role": "user", "content": "next"}]


def test_gradio_chatbot_value_to_messages():
    # Gradio 6's normalised Chatbot value: content is a list of typed parts.
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Is "}, {"type": "text", "text": "it safe?"}]},
        {"role": "assistant", "content": [{"type": "file", "file": {"path": "/x.png"}}]},
        {"role": "assistant", "content": "Yes."},
        {"role": "system", "content": "ignored"},
    ]
    assert chatbot_history_to_messages(history, "sys") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Is it safe?"},
        {"role": "assistant", "content": "Yes."},
    ]


def test_user_turn_uses_the_training_context_shape():
    from medtune.training.prompts import user_message

    assert user_turn(" Q? ", "") == "Q?"
    assert user_turn("Q?", " abstract ") == user_message("Q?", "abstract") == "Q?\n\nContext:\nabstract"


# ---------------------------------------------------------------- stream accumulation and metrics

def test_stream_accumulation_ttft_usage_and_rate():
    answer = Answer(model="base")
    answer.start(10.0)
    answer.feed(chunk(content="", model="base"), 10.1)  # role-only first chunk: not a token
    assert answer.status == "pending" and answer.first_token is None
    answer.feed(chunk(content="Yes", model="base"), 10.5)
    answer.feed(chunk(content=". It works."), 10.9)
    answer.feed(chunk(finish="stop", medtune={"guardrail": None, "checkpoint": "r/step_3"}), 11.0)
    answer.feed(chunk(usage=8), 11.0)  # include_usage: last chunk, no choices
    answer.finish(12.0)
    assert answer.text == "Yes. It works." and answer.status == DONE and answer.served_model == "base"
    assert answer.checkpoint == "r/step_3" and answer.guardrail is None
    m = answer.metrics()
    assert m.ttft_s == pytest.approx(0.5) and m.total_s == pytest.approx(2.0)
    assert m.tokens == 8 and m.tokens_source == "usage" and m.tokens_per_s == pytest.approx(4.0)
    assert format_metrics(m) == "TTFT 0.50 s · 4.0 tok/s · 8 tokens in 2.00 s"
    assert render_answer(answer).startswith("Yes. It works.\n\n_TTFT 0.50 s")


def test_without_usage_tokens_fall_back_to_chunks_and_say_so():
    answer = Answer(model="x")
    answer.start(0.0)
    for i, piece in enumerate(["a", "b", "c"]):
        answer.feed(chunk(content=piece), 0.1 * (i + 1))
    answer.feed(chunk(finish="length"), 0.4)
    answer.finish(1.5)
    m = answer.metrics()
    assert (m.tokens, m.tokens_source, m.tokens_per_s) == (3, "chunks", pytest.approx(2.0))
    shown = render_answer(answer)
    assert "chunks/s" in shown and "no usage reported" in shown and "cut at max tokens" in shown


def test_content_filter_is_a_guardrail_block_with_its_category():
    answer = Answer(model="finetuned")
    answer.start(0.0)
    guard = {"stage": "output", "action": "block", "category": "self_harm", "reason": "matched a rule"}
    answer.feed(chunk(content="I can't help with that; please contact a clinician.", finish="content_filter",
                      medtune={"guardrail": guard}), 0.2)
    answer.finish(0.3)
    assert answer.status == BLOCKED and answer.guardrail == guard
    shown = render_answer(answer)
    assert shown.startswith("🛡️ **Blocked by guardrails** (self_harm, output)")
    assert "contact a clinician" in shown and "matched a rule" in shown
    # A block without the extension (another server) is still shown as a block, not an empty answer.
    bare = Answer(model="x")
    bare.start(0.0)
    bare.feed(chunk(finish="content_filter"), 0.1)
    bare.finish(0.1)
    assert bare.status == BLOCKED and "Blocked by guardrails" in render_answer(bare)
    assert "withheld" in render_answer(bare)


def test_a_redacted_answer_says_so():
    answer = Answer(model="x")
    answer.start(0.0)
    answer.feed(chunk(content="Call [REDACTED] for help."), 0.1)
    answer.feed(chunk(finish="stop", medtune={"guardrail": {"stage": "output", "action": "redact",
                                                           "category": "pii", "reason": "phone number"}}), 0.2)
    answer.finish(0.2)
    assert answer.status == DONE
    assert render_answer(answer).startswith("Call [REDACTED] for help.\n\n_🛡️ Redacted by guardrails (pii, output) · ")


def test_stop_and_failure_are_final_and_late_chunks_are_ignored():
    answer = Answer(model="x")
    answer.start(0.0)
    answer.feed(chunk(content="part"), 0.1)
    answer.stop(0.2)
    answer.feed(chunk(content=" more"), 0.3)
    answer.fail("boom", 0.4)
    answer.finish(0.5)
    assert (answer.text, answer.status, answer.ended) == ("part", STOPPED, 0.2)
    assert "⏹ stopped" in render_answer(answer)
    failed = Answer(model="x")
    failed.start(0.0)
    failed.fail("Cannot reach the model endpoint", 1.0)
    assert failed.status == ERROR and render_answer(failed) == "⚠️ **Cannot reach the model endpoint**"


def test_render_pane_is_gradio_messages():
    pane = Pane("Base model", "base", [Turn("q", done_answer("a"))])
    pending = Answer(model="base")
    pending.start(0.0)
    pane.turns.append(Turn("q2", pending))
    value = render_pane(pane)
    assert [m["role"] for m in value] == ["user", "assistant", "user", "assistant"]
    assert value[1]["content"].startswith("a") and "waiting for the first token" in value[3]["content"]


# ---------------------------------------------------------------- /v1/models, titles

MODELS_WIRE = [
    {"id": "base", "object": "model", "created": 0, "owned_by": "medtune",
     "medtune": {"kind": "base", "checkpoint": None, "base_model": "/s/models/smollm2-135m-instruct"}},
    {"id": "finetuned", "object": "model", "created": 0, "owned_by": "medtune",
     "medtune": {"kind": "finetuned", "checkpoint": CKPT, "run_id": "run-1", "step": 7}},
    {"id": CKPT, "object": "model", "created": 0, "owned_by": "medtune",
     "medtune": {"kind": "checkpoint", "checkpoint": CKPT, "run_id": "run-1", "step": 7}},
]


def models_from_wire(rows=MODELS_WIRE) -> dict[str, ModelInfo]:
    from openai.types import Model

    return {row["id"]: ModelInfo.parse(Model.model_validate(row)) for row in rows}


def test_titles_name_model_and_checkpoint_step():
    models = models_from_wire()
    session = new_session()
    assert resolve_model("finetuned", models)[0] == CKPT  # pinned to the concrete checkpoint
    assert resolve_model("base", models)[0] == "base"
    assert format_title(session.right, models) == f"### Fine-tuned · `{CKPT}`\n_step 7 · run run-1_"
    assert format_title(session.left, models) == "### Base model · `base`\n_base smollm2-135m-instruct_"


def test_titles_fall_back_without_the_extension_or_the_fine_tune():
    plain = models_from_wire([{"id": "base", "object": "model", "created": 0, "owned_by": "x"},
                              {"id": "finetuned", "object": "model", "created": 0, "owned_by": "x"}])
    session = new_session()
    assert format_title(session.right, plain) == "### Fine-tuned · `finetuned`"
    assert resolve_model("finetuned", plain)[0] == "finetuned"
    only_base = models_from_wire(MODELS_WIRE[:1])
    assert "no fine-tuned checkpoint published yet" in format_title(session.right, only_base)
    assert "model list unavailable: down" in format_title(session.right, {}, "down")
    stale = format_title(session.right, models_from_wire(), "down")
    assert stale.startswith(f"### Fine-tuned · `{CKPT}`\n_step 7") and "model list unavailable, last known shown" in stale


# ---------------------------------------------------------------- votes

def make_exchange() -> Exchange:
    left, right = done_answer("No.", model="base"), done_answer("Yes. Because.", model=CKPT)
    right.completion_tokens = 4
    return Exchange(question="Q?", answers={LEFT: left, RIGHT: right}, models={LEFT: "base", RIGHT: CKPT},
                    checkpoint=CKPT, system_prompt="", params={"temperature": 0.7, "top_p": 0.95, "max_tokens": 64},
                    turn=1, time="2025-01-01T00:00:00+00:00")


def test_vote_record_fields():
    rec = vote_record(make_exchange(), "right", when="2025-01-01T00:00:05+00:00")
    assert rec["schema"] == VOTE_SCHEMA and rec["vote"] == "right" and rec["winner"] == CKPT
    assert rec["answers"] == {"left": "No.", "right": "Yes. Because."}
    assert rec["models"] == {"left": "base", "right": CKPT} and rec["checkpoint"] == CKPT
    assert rec["latency"]["right"] == {"ttft_s": None, "total_s": 1.0, "tokens": 4, "tokens_source": "usage",
                                       "tokens_per_s": 4.0}
    assert rec["time"] == "2025-01-01T00:00:05+00:00" and rec["question"] == "Q?"
    assert vote_record(make_exchange(), "tie")["winner"] is None
    with pytest.raises(MedtuneError, match="unknown vote 'maybe'"):
        vote_record(make_exchange(), "maybe")


def test_append_jsonl_from_many_processes_keeps_whole_lines(tmp_path):
    path = tmp_path / "chat" / "votes.jsonl"
    code = (
        "import sys; from medtune.chatbot.conversation import append_jsonl\n"
        "for i in range(50): append_jsonl(sys.argv[1], {'w': sys.argv[2], 'i': i, 'pad': 'x' * 3000})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(w)], cwd=REPO) for w in range(4)]
    assert all(p.wait(60) == 0 for p in procs)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 200
    assert sorted((r["w"], r["i"]) for r in rows) == sorted((str(w), i) for w in range(4) for i in range(50))


# ---------------------------------------------------------------- a fake OpenAI endpoint

class FakeOpenAI:
    """A small OpenAI-shaped HTTP server (stdlib) whose behaviour is picked by the model id."""

    def __init__(self, port: int = 0, token_delay: float = 0.02):
        self.requests: list[dict] = []
        self.events: list[tuple[str, str, float]] = []  # (model, "start"|"end", time)
        self.token_delay = token_delay
        self.models = MODELS_WIRE + [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                                     for m in ("blocked", "http500", "slow", "dropped", "errorevent", "endless")]
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._json(200, {"object": "list", "data": fake.models})
                else:
                    self._json(404, {"error": {"message": "not found", "type": "not_found", "param": None, "code": 404}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                try:
                    fake.respond(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _json(self, code, obj, headers=()):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.handler = Handler
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def respond(self, h, body):
        model = body["model"]
        self.events.append((model, "start", time.monotonic()))
        if model == "http500":
            return h._json(500, {"error": {"message": "engine crashed", "type": "internal_error", "param": None,
                                           "code": 500}})
        if model not in {m["id"] for m in self.models}:
            return h._json(404, {"error": {"message": f"model {model!r} not found", "type": "not_found",
                                           "param": "model", "code": 404}})
        if model == "slow":
            time.sleep(3)
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()

        def send(obj):
            h.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            h.wfile.flush()

        def delta(content=None, finish=None, **extra):
            choice = {"index": 0, "delta": {} if content is None else {"content": content}, "finish_reason": finish}
            return {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": model,
                    "choices": [choice], **extra}

        n_user = sum(1 for m in body["messages"] if m["role"] == "user")
        if model == "blocked":
            send(delta(content="This request was blocked.", finish="content_filter",
                       medtune={"guardrail": {"stage": "input", "action": "block", "category": "dosing",
                                              "reason": "asks for a lethal dose"}}))
        elif model == "errorevent":
            send(delta(content="Half"))
            send({"error": {"message": "engine died", "type": "internal_error", "param": None, "code": 500}})
        elif model in ("dropped", "endless"):
            send(delta(content="Partial"))
            for _ in range(400 if model == "endless" else 0):
                time.sleep(self.token_delay)
                send(delta(content=" more"))
            return  # the connection closes with no finish reason and no [DONE]
        else:
            words = f"{model} answer to turn {n_user} ({len(body['messages'])} messages)".split()
            for i, word in enumerate(words):
                send(delta(content=word if i == 0 else " " + word))
                time.sleep(self.token_delay)
            send(delta(finish="stop", medtune={"guardrail": None, "checkpoint": CKPT if model == CKPT else None}))
            if (body.get("stream_options") or {}).get("include_usage"):
                send({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
                      "usage": {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}})
        h.wfile.write(b"data: [DONE]\n\n")
        self.events.append((model, "end", time.monotonic()))


def drive(client_factory, session, question, sides=(LEFT, RIGHT), settings=None, on_update=None):
    """Run one exchange to the end in a fresh event loop; returns how many redraws it yielded."""

    async def go():
        client = client_factory()
        n = 0
        try:
            async for _ in run_exchange(client, session, question, sides, settings or Settings(max_tokens=32)):
                n += 1
                if on_update:
                    on_update(session)
        finally:
            await client.close()
        return n

    return asyncio.run(go())


@pytest.fixture
def fake():
    with FakeOpenAI() as server:
        yield server


def test_both_panes_stream_concurrently_each_with_its_own_history(fake):
    session = new_session()
    updates = drive(lambda: ChatClient(fake.base), session, "Does it work?")
    left, right = session.left.turns[-1].answer, session.right.turns[-1].answer
    assert left.status == DONE and right.status == DONE and updates > 3
    assert left.text == "base answer to turn 1 (1 messages)"
    assert right.model == CKPT and right.text == f"{CKPT} answer to turn 1 (1 messages)"  # pinned id sent
    assert left.completion_tokens == 7 and left.metrics().ttft_s > 0 and left.metrics().tokens_per_s > 0
    starts = {m: t for m, what, t in fake.events if what == "start"}
    ends = {m: t for m, what, t in fake.events if what == "end"}
    assert max(starts.values()) < min(ends.values()), "the second request waited for the first to finish"
    assert fake.requests[0]["stream"] is True and fake.requests[0]["stream_options"] == {"include_usage": True}
    assert session.exchange is not None and session.exchange.checkpoint == CKPT

    fake.requests.clear()
    drive(lambda: ChatClient(fake.base), session, "And then?", settings=Settings(system_prompt="Be brief."))
    sent = {r["model"]: r["messages"] for r in fake.requests}
    assert sent["base"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Does it work?"},
        {"role": "assistant", "content": "base answer to turn 1 (1 messages)"},
        {"role": "user", "content": "And then?"},
    ]
    assert sent[CKPT][2] == {"role": "assistant", "content": f"{CKPT} answer to turn 1 (1 messages)"}
    assert session.right.turns[-1].answer.text == f"{CKPT} answer to turn 2 (4 messages)"
    assert session.exchange.turn == 2


def test_single_model_mode_sends_to_one_pane_and_offers_no_vote(fake):
    session = new_session()
    drive(lambda: ChatClient(fake.base), session, "Only you", sides=(RIGHT,))
    assert session.left.turns == [] and len(session.right.turns) == 1
    assert [r["model"] for r in fake.requests] == [CKPT] and session.exchange is None


def test_endpoint_down_is_a_readable_message_and_the_next_send_recovers():
    port = free_port()
    session = new_session()
    drive(lambda: ChatClient(f"http://127.0.0.1:{port}/v1"), session, "Anyone there?")
    for side in (LEFT, RIGHT):
        answer = session.pane(side).turns[-1].answer
        assert answer.status == ERROR
        assert f"Cannot reach the model endpoint at http://127.0.0.1:{port}/v1" in answer.error
        assert "Send again to retry" in answer.error
    assert session.models_error and "Cannot reach" in session.models_error and session.exchange is None
    assert "model list unavailable" in format_title(session.right, session.models, session.models_error)
    with FakeOpenAI(port=port) as server:
        drive(lambda: ChatClient(server.base), session, "Back?")
    assert session.left.turns[-1].answer.status == DONE and session.right.turns[-1].answer.model == CKPT
    assert session.models_error is None and session.exchange is not None
    # The failed turn is not replayed as history.
    assert [m["content"] for m in server.requests[0]["messages"]] == ["Back?"]


@pytest.mark.parametrize("model, status, expected", [
    ("http500", ERROR, "The endpoint answered HTTP 500: engine crashed Send again to retry."),
    ("missing", ERROR, "The endpoint answered HTTP 404: model 'missing' not found The endpoint does not serve `missing`."),
    ("dropped", ERROR, "ended without a finish reason"),
    ("errorevent", ERROR, "reported an error mid-answer: engine died"),
    ("blocked", BLOCKED, "Blocked by guardrails** (dosing, input)"),
])
def test_one_failing_pane_does_not_affect_the_other(fake, model, status, expected):
    session = new_session(left_model="base", right_model=model)
    drive(lambda: ChatClient(fake.base), session, "Q")
    left, right = session.left.turns[-1].answer, session.right.turns[-1].answer
    assert left.status == DONE and left.text.startswith("base answer")
    assert right.status == status
    assert expected in render_answer(right)
    if model == "dropped":
        assert right.text == "Partial"  # what arrived is kept
    # A vote is offered when both answered, a guardrail block included; not after an error.
    assert (session.exchange is not None) == (status == BLOCKED)


def test_slow_endpoint_times_out_with_a_message(fake):
    session = new_session(left_model="base", right_model="slow")
    t0 = time.monotonic()
    drive(lambda: ChatClient(fake.base, timeout_s=0.5), session, "Q")
    assert time.monotonic() - t0 < 2.5
    right = session.right.turns[-1].answer
    assert right.status == ERROR and "No answer from the endpoint within 0.5 s" in right.error
    assert session.left.turns[-1].answer.status == DONE


def test_stop_ends_both_streams_and_keeps_the_partial_answers(fake):
    session = new_session(left_model="endless", right_model="endless")

    pressed = []

    def press_stop_once_text_arrives(s):
        if not pressed and all(s.pane(side).turns[-1].answer.text for side in (LEFT, RIGHT)):
            s.stop_requested = True
            pressed.append(time.monotonic())

    drive(lambda: ChatClient(fake.base), session, "Go on forever", on_update=press_stop_once_text_arrives)
    assert pressed and time.monotonic() - pressed[0] < 1.5  # the endless stream would go on for 8 s
    for side in (LEFT, RIGHT):
        answer = session.pane(side).turns[-1].answer
        assert answer.status == STOPPED and answer.text.startswith("Partial")
        assert "⏹ stopped" in render_answer(answer)
    assert not session.busy and not session.stop_requested
    assert session.exchange is not None  # a stopped exchange can still be voted on


def test_regenerate_and_clear(fake):
    session = new_session()
    drive(lambda: ChatClient(fake.base), session, "First")
    drive(lambda: ChatClient(fake.base), session, "Second")
    assert undo_last(session) == "Second"
    assert [t.question for t in session.left.turns] == ["First"] and session.exchange is None
    drive(lambda: ChatClient(fake.base), session, "Second")
    assert len(session.right.turns) == 2
    clear(session, (LEFT,))  # one pane's trash icon: only its history goes
    assert session.left.turns == [] and len(session.right.turns) == 2 and session.exchange is None
    assert undo_last(session) == "Second" and len(session.right.turns) == 1
    clear(session)
    assert session.left.turns == [] and session.right.turns == [] and undo_last(session) is None


# ---------------------------------------------------------------- CLI settings

def parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    chat_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_defaults_and_environment(monkeypatch, tmp_path):
    for var in ("MEDTUNE_API_BASE", "MEDTUNE_API_KEY", "MEDTUNE_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    config = chat_cli.config_from_args(parse([]))
    assert config.api_base == "http://127.0.0.1:8000/v1" and config.api_key is None
    assert config.votes_path == Path("storage/chat/votes.jsonl")
    args = parse([])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    monkeypatch.setenv("MEDTUNE_API_BASE", "http://svc:8000/v1")
    monkeypatch.setenv("MEDTUNE_API_KEY", "sk-env")
    monkeypatch.setenv("MEDTUNE_STORAGE", str(tmp_path))
    config = chat_cli.config_from_args(parse([]))
    assert (config.api_base, config.api_key) == ("http://svc:8000/v1", "sk-env")
    assert config.votes_path == tmp_path / "chat" / "votes.jsonl"
    key_file = tmp_path / "key"
    key_file.write_text("sk-file\n")
    config = chat_cli.config_from_args(parse(["--api-base", "http://h:1/v1", "--api-key-file", str(key_file)]))
    assert (config.api_base, config.api_key) == ("http://h:1/v1", "sk-file")


def test_cli_reports_every_bad_setting_at_once(tmp_path):
    with pytest.raises(MedtuneError) as err:
        chat_cli.config_from_args(parse(["--port", "70000", "--timeout", "0", "--votes", str(tmp_path)]))
    message = str(err.value)
    assert "--port 70000" in message and "--timeout 0" in message and f"--votes {tmp_path}" in message
    with pytest.raises(MedtuneError, match="expected an http"):
        chat_cli.config_from_args(parse(["--api-base", "127.0.0.1:8000"]))
    with pytest.raises(MedtuneError, match="cannot read it"):
        chat_cli.config_from_args(parse(["--api-key-file", str(tmp_path / "nope")]))


# ---------------------------------------------------------------- the Gradio app, without a browser

def test_app_wiring_through_gradio_client(fake, tmp_path):
    """The Blocks' events, called the way the browser calls them: send streams both panes,
    a vote lands in the JSONL, a stopped endpoint shows a message in the panes."""
    from gradio_client import Client

    from medtune.chatbot.app import AppConfig, build_app

    votes = tmp_path / "votes.jsonl"
    demo = build_app(AppConfig(api_base=fake.base, votes_path=votes))
    demo.queue(default_concurrency_limit=None)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert {"/send", "/stop", "/clear", "/vote_left"} <= set(api)
        out = client.predict("Is it safe?", "", "", 0.7, 0.95, 32, "Side by side", api_name="/send")
        # The vote row (a layout block) is not part of the API's outputs.
        left, right, left_title, right_title, notice, _message = out
        text = [m["content"][0]["text"] for m in right]
        assert text[0] == "Is it safe?" and text[1].startswith(f"{CKPT} answer to turn 1") and "tok/s" in text[1]
        assert left[1]["content"][0]["text"].startswith("base answer to turn 1")
        assert CKPT in right_title and "step 7" in right_title and notice == ""
        client.predict(api_name="/vote_left")
        rows = [json.loads(line) for line in votes.read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["vote"] == "left" and rows[0]["question"] == "Is it safe?"
        assert rows[0]["checkpoint"] == CKPT and rows[0]["answers"]["left"].startswith("base answer")

        fake.__exit__(None, None, None)  # the endpoint goes down
        left, right, *_ = client.predict("Still there?", "", "", 0.7, 0.95, 32, "Side by side", api_name="/send")
        assert "Cannot reach the model endpoint" in right[-1]["content"][0]["text"]
        with FakeOpenAI(port=fake.port):  # ... and comes back on the same address
            left, right, *_ = client.predict("Back?", "", "", 0.7, 0.95, 32, "Side by side", api_name="/send")
        # The failed turn stays on screen but is not replayed: the model sees turn 1 and "Back?".
        assert right[-1]["content"][0]["text"].startswith(f"{CKPT} answer to turn 2 (3 messages)")
    finally:
        demo.close()
