"""The Gradio Blocks app: one message box, the base model and the fine-tune side by side.

`build_app(config)` returns the Blocks; `medtune chat` (chatbot/cli.py) launches it. The logic
lives in conversation.py (pure) and client.py (the OpenAI endpoint); this module is layout and
event wiring only. Stop is cooperative: it sets a flag the running exchange checks every 0.1 s,
so the partial answers, their metrics and a vote survive, and closing the HTTP streams tells the
server to stop generating.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from medtune.chatbot.client import DEFAULT_API_BASE, ChatClient, Settings, clear, refresh_models, run_exchange, undo_last
from medtune.chatbot.conversation import (
    LEFT,
    RIGHT,
    VOTES,
    Session,
    append_jsonl,
    format_title,
    new_session,
    render_pane,
    user_turn,
    vote_record,
)

log = logging.getLogger(__name__)

MODES = {"Side by side": (LEFT, RIGHT), "Base model only": (LEFT,), "Fine-tuned only": (RIGHT,)}

# [question, context]: PubMedQA-style questions; the fine-tune was trained with an abstract as
# context, the last two show that shape.
EXAMPLES = [
    ["Does aspirin reduce the risk of stroke in adults with atrial fibrillation?", ""],
    ["Is early mobilisation after abdominal surgery associated with a shorter hospital stay?", ""],
    ["Can vitamin D supplementation prevent respiratory infections in children?", ""],
    ["What are the warning signs of sepsis in an elderly patient?", ""],
    [
        "Does a nurse-led telephone follow-up reduce readmissions after heart failure discharge?",
        "Methods: 412 patients discharged after heart failure were randomised to weekly nurse calls for "
        "three months or usual care. Results: 30-day readmission was 11% with calls and 19% with usual care "
        "(p=0.02); mortality did not differ.",
    ],
    [
        "Is metformin use associated with lower cancer incidence in type 2 diabetes?",
        "Methods: a cohort of 8,000 adults with type 2 diabetes followed for 6 years. Results: cancer "
        "incidence was similar in metformin users and non-users after adjustment (HR 0.97, 95% CI 0.85-1.11).",
    ],
]

CSS = """
.pane-title h3 { margin-bottom: 0; }
#notice { min-height: 1.5em; }
"""


@dataclass
class AppConfig:
    api_base: str = DEFAULT_API_BASE
    api_key: str | None = None
    votes_path: Path = Path("storage/chat/votes.jsonl")
    left_model: str = "base"
    right_model: str = "finetuned"
    timeout_s: float = 120.0
    max_history_turns: int = 10
    default_max_tokens: int = 256


class _Endpoint:
    """The app's ChatClient, created on first use inside Gradio's event loop."""

    def __init__(self, config: AppConfig):
        self.config = config
        self._client: ChatClient | None = None

    @property
    def client(self) -> ChatClient:
        if self._client is None:
            self._client = ChatClient(self.config.api_base, self.config.api_key, timeout_s=self.config.timeout_s)
        return self._client


def build_app(config: AppConfig) -> gr.Blocks:
    endpoint = _Endpoint(config)
    votes_path = Path(config.votes_path)

    def view(session: Session, notice: str | None = None):
        """Every output of the exchange handlers, from the session."""
        return (
            session,
            render_pane(session.left),
            render_pane(session.right),
            format_title(session.left, session.models, session.models_error),
            format_title(session.right, session.models, session.models_error),
            gr.Row(visible=session.exchange is not None and not session.busy),
            gr.skip() if notice is None else notice,
        )

    def settings_from(system, temperature, top_p, max_tokens) -> Settings:
        return Settings(system_prompt=system or "", temperature=float(temperature), top_p=float(top_p),
                        max_tokens=int(max_tokens), max_history_turns=config.max_history_turns)

    async def exchange(session: Session, question: str, mode: str, settings: Settings):
        try:
            async for _ in run_exchange(endpoint.client, session, question, MODES.get(mode, (LEFT, RIGHT)), settings):
                yield view(session, "")
        except Exception as err:  # a bug, not the endpoint (run_exchange reports those per pane)
            log.exception("exchange failed")
            yield view(session, f"⚠️ Internal error: {type(err).__name__}: {err}")

    async def on_send(session, question, context, system, temperature, top_p, max_tokens, mode):
        if session.busy:
            yield (*view(session, "A reply is still streaming: press Stop first."), gr.skip())
            return
        text = user_turn(question or "", context or "") if (question or "").strip() else ""
        if not text:
            yield (*view(session, "Type a question first (or click an example)."), gr.skip())
            return
        first = True
        async for outputs in exchange(session, text, mode, settings_from(system, temperature, top_p, max_tokens)):
            # Clear the message box once; later redraws leave whatever the user types next alone.
            yield (*outputs, "" if first else gr.skip())
            first = False

    async def on_regenerate(session, system, temperature, top_p, max_tokens, mode):
        question = undo_last(session)
        if question is None:
            yield view(session, "Nothing to regenerate yet." if not session.busy else "A reply is still streaming.")
            return
        async for outputs in exchange(session, question, mode, settings_from(system, temperature, top_p, max_tokens)):
            yield outputs

    def on_stop(session):
        if not session.busy:
            return "Nothing is streaming."
        session.stop_requested = True
        return "Stopping…"

    def on_clear(session, sides=(LEFT, RIGHT)):
        if session.busy:
            session.stop_requested = True
        clear(session, sides)
        return view(session, "Cleared both conversations." if len(sides) == 2 else "Cleared that conversation.")

    async def on_refresh(session):
        await refresh_models(endpoint.client, session)
        return view(session, "" if session.models_error is None else f"⚠️ {session.models_error}")

    def on_vote(session, vote):
        exchange_ = session.exchange
        if exchange_ is None:
            return view(session, "Nothing to vote on: send a question first.")
        record = vote_record(exchange_, vote)
        try:
            append_jsonl(votes_path, record)
        except OSError as err:
            return view(session, f"⚠️ Could not record the vote in {votes_path}: {err}")
        session.exchange = None
        return view(session, f"Vote recorded: **{VOTES[vote]}** ({votes_path})")

    def on_mode(mode):
        sides = MODES.get(mode, (LEFT, RIGHT))
        return gr.Column(visible=LEFT in sides), gr.Column(visible=RIGHT in sides)

    with gr.Blocks(title="medtune chat", analytics_enabled=False) as demo:
        session = gr.State(new_session(config.left_model, config.right_model))
        gr.Markdown(f"## medtune chat: base vs fine-tuned\nEndpoint: `{config.api_base}` · votes go to `{votes_path}`")
        with gr.Row(equal_height=True):
            with gr.Column(scale=1) as left_col:
                left_title = gr.Markdown("### Base model", elem_classes="pane-title", elem_id="title-left")
                left_chat = gr.Chatbot(show_label=False, elem_id="pane-left", height=460, buttons=["copy"],
                                       feedback_options=None)
            with gr.Column(scale=1) as right_col:
                right_title = gr.Markdown("### Fine-tuned", elem_classes="pane-title", elem_id="title-right")
                right_chat = gr.Chatbot(show_label=False, elem_id="pane-right", height=460, buttons=["copy"],
                                        feedback_options=None)
        with gr.Row(visible=False) as vote_row:
            vote_buttons = {vote: gr.Button(label, elem_id=f"vote-{vote}", size="sm") for vote, label in VOTES.items()}
        notice = gr.Markdown("", elem_id="notice")
        with gr.Row():
            message = gr.Textbox(placeholder="Ask a medical question and press Enter", show_label=False,
                                 elem_id="message", scale=8, lines=1, max_lines=6, autofocus=True)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
            stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
        with gr.Row():
            regenerate = gr.Button("Regenerate", size="sm", elem_id="regenerate")
            clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
            refresh = gr.Button("Refresh models", size="sm", elem_id="refresh")
        with gr.Accordion("Context (optional abstract, the format the fine-tune was trained on)", open=False):
            context = gr.Textbox(show_label=False, lines=4, elem_id="context",
                                 placeholder="Paste an abstract here; it is sent after the question as 'Context:'")
        gr.Examples(EXAMPLES, inputs=[message, context], label="Example questions (click one, then Send)")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            mode = gr.Radio(list(MODES), value="Side by side", label="Mode", elem_id="mode")
            system = gr.Textbox(label="System prompt", lines=2, elem_id="system",
                                placeholder="Empty: each model's default (the fine-tune's training prompt)")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top_p")
                max_tokens = gr.Slider(1, 2048, value=config.default_max_tokens, step=1, label="Max tokens")

        panes = [session, left_chat, right_chat, left_title, right_title, vote_row, notice]
        controls = [system, temperature, top_p, max_tokens, mode]
        gr.on([message.submit, send.click], on_send, inputs=[session, message, context, *controls],
              outputs=[*panes, message], trigger_mode="once", show_progress="hidden", concurrency_limit=None,
              api_name="send")
        regenerate.click(on_regenerate, inputs=[session, *controls], outputs=panes, trigger_mode="once",
                         show_progress="hidden", concurrency_limit=None, api_name="regenerate")
        # Not queued: Stop must run while the exchange it stops holds the queue slot.
        stop.click(on_stop, inputs=[session], outputs=[notice], queue=False, api_name="stop")
        clear_btn.click(on_clear, inputs=[session], outputs=panes, queue=False, api_name="clear")
        # A pane's own trash icon forgets that pane's history too, not just what is on screen.
        left_chat.clear(functools.partial(on_clear, sides=(LEFT,)), inputs=[session], outputs=panes, queue=False,
                        api_visibility="private")
        right_chat.clear(functools.partial(on_clear, sides=(RIGHT,)), inputs=[session], outputs=panes, queue=False,
                         api_visibility="private")
        refresh.click(on_refresh, inputs=[session], outputs=panes, show_progress="hidden", api_name="refresh")
        for vote, button in vote_buttons.items():
            button.click(functools.partial(on_vote, vote=vote), inputs=[session], outputs=panes, queue=False,
                         api_name=f"vote_{vote}")
        mode.change(on_mode, inputs=[mode], outputs=[left_col, right_col], queue=False, api_visibility="private")
        demo.load(on_refresh, inputs=[session], outputs=panes, show_progress="hidden", api_visibility="private")
    return demo


def launch(config: AppConfig, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_app(config)
    demo.queue(default_concurrency_limit=None)
    demo.launch(server_name=host, server_port=port, css=CSS, prevent_thread_lock=not block, show_error=True,
                quiet=not block)
    return demo
