"""Prompt formats shared by data building, training, serving and evaluation.

`--prompt-type` picks one:
  1     instruction / input / response text (Alpaca-style), answer then EOS
  2     the seed's marker format with context: <START_Q>question\\ncontext<END_Q><START_A>answer<END_A>
  3     the seed's marker format, question only (closed book)
  chat  the model's own chat template (system + user turn, the answer as the assistant turn)

The answer a model learns starts with the decision word when one exists ("Yes. ..."), then the
long answer, so the decision can be read off the first word of a generation.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_TYPES: tuple[str, ...] = ("1", "2", "3", "chat")
MARKER_TOKENS: tuple[str, ...] = ("<START_Q>", "<END_Q>", "<START_A>", "<END_A>")

SYSTEM_PROMPT = (
    "You are a careful biomedical research assistant. Answer the question using the context. "
    "Begin with Yes, No or Maybe, then explain briefly."
)

INSTRUCTION_HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)


def answer_text(answer: str, decision: str | None) -> str:
    """The target text: the decision word first (when known), then the long answer."""
    answer = answer.strip()
    if decision:
        return f"{decision.capitalize()}. {answer}"
    return answer


def user_message(question: str, context: str) -> str:
    """The user turn of the chat format (also what chat clients should send)."""
    question = question.strip()
    context = context.strip()
    return f"{question}\n\nContext:\n{context}" if context else question


@dataclass(frozen=True)
class TextPrompt:
    """A plain-text prompt and the text that closes the answer (before EOS)."""

    prompt: str
    answer_suffix: str


def text_prompt(prompt_type: str, question: str, context: str) -> TextPrompt:
    """The prompt text for the non-chat formats (types 1, 2, 3)."""
    question = question.strip()
    context = context.strip()
    if prompt_type == "1":
        parts = [INSTRUCTION_HEADER, "", "### Instruction:", question, ""]
        if context:
            parts += ["### Input:", context, ""]
        parts += ["### Response:", ""]
        return TextPrompt("\n".join(parts), "")
    if prompt_type == "2":
        body = f"{question}\n{context}" if context else question
        return TextPrompt(f"<START_Q>{body}<END_Q><START_A>", "<END_A>")
    if prompt_type == "3":
        return TextPrompt(f"<START_Q>{question}<END_Q><START_A>", "<END_A>")
    raise ValueError(f"not a text prompt type: {prompt_type!r} (expected one of 1, 2, 3)")


def chat_messages(question: str, context: str, answer: str | None = None, system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """OpenAI-style messages for the chat format; with `answer`, the assistant turn is included."""
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user_message(question, context)})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


CONTEXT_SEPARATOR = "\n\nContext:\n"


def chat_template_for(prompt_type: str, bos: bool) -> str:
    """A Jinja chat template that renders OpenAI messages into the training prompt of a text
    prompt type, so a server applying the checkpoint's template builds the prompt the model was
    trained on. The last user message is the question; text after "\\n\\nContext:\\n" in it is
    the context (the shape `user_message` produces). `bos`: whether training prompts began with BOS.
    """
    if prompt_type not in ("1", "2", "3"):
        raise ValueError(f"prompt type {prompt_type!r} uses the model's own chat template")
    head = (
        "{%- set ns = namespace(q='', a='') -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{%- set ns.q = m['content'] -%}{%- set ns.a = '' -%}"
        "{%- elif m['role'] == 'assistant' -%}{%- set ns.a = m['content'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set sep = '\\n\\nContext:\\n' -%}"
        "{%- if sep in ns.q -%}{%- set parts = ns.q.split(sep, 1) -%}"
        "{%- set question = parts[0] | trim -%}{%- set context = parts[1] | trim -%}"
        "{%- else -%}{%- set question = ns.q | trim -%}{%- set context = '' -%}{%- endif -%}"
    )
    bos_part = "{{ bos_token }}" if bos else ""
    if prompt_type == "1":
        header = INSTRUCTION_HEADER.replace("'", "\\'")
        body = (
            f"{bos_part}{{{{ '{header}' }}}}\n\n### Instruction:\n{{{{ question }}}}\n\n"
            "{% if context %}### Input:\n{{ context }}\n\n{% endif %}### Response:\n"
        )
        tail = "{% if ns.a and not add_generation_prompt %}{{ ns.a }}{{ eos_token }}{% endif %}"
    elif prompt_type == "2":
        # A newline right after a block tag is eaten by trim_blocks, so emit it as an expression.
        body = f"{bos_part}<START_Q>{{{{ question }}}}{{% if context %}}{{{{ '\\n' + context }}}}{{% endif %}}<END_Q><START_A>"
        tail = "{% if ns.a and not add_generation_prompt %}{{ ns.a }}<END_A>{{ eos_token }}{% endif %}"
    else:
        body = f"{bos_part}<START_Q>{{{{ question }}}}<END_Q><START_A>"
        tail = "{% if ns.a and not add_generation_prompt %}{{ ns.a }}<END_A>{{ eos_token }}{% endif %}"
    return head + body + tail
