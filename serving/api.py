"""The OpenAI-compatible HTTP layer: FastAPI routes over a `Service`.

Request bodies are validated against the `openai` package's own request types (TypedDicts,
through a pydantic TypeAdapter) and responses are built from its response models, so the
shapes are the ones the official client expects. Extra fields the client may send are
ignored; features this server does not have (n > 1, tools, images) are refused with 400.

    GET  /health                 200 when engines are loaded, 503 before (no key needed)
    GET  /v1/models              base, finetuned, <run_id>/step_N; extra field `medtune`
    POST /v1/chat/completions    stream or not; guardrails before and after the engine
    POST /v1/completions         raw prompt (no chat template); same guardrails

Errors are `{"error": {"message", "type", "param", "code"}}` with 400/401/404/413/429/503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types import completion_create_params as completion_params
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage, ChatCompletionTokenLogprob
from openai.types.chat import completion_create_params as chat_params
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.completion_choice import Logprobs as CompletionLogprobs
from pydantic import TypeAdapter, ValidationError

from medtune.guardrails.base import NoGuard, Verdict
from medtune.serving.engine import Delta, EngineError, GenRequest, TokenLogprob
from medtune.serving.service import ModelNotFound, ServedModel, Service

log = logging.getLogger(__name__)

CHAT_REQUEST = TypeAdapter(chat_params.CompletionCreateParamsNonStreaming | chat_params.CompletionCreateParamsStreaming)
COMPLETION_REQUEST = TypeAdapter(completion_params.CompletionCreateParamsNonStreaming | completion_params.CompletionCreateParamsStreaming)
MAX_TOP_LOGPROBS = 20
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "response_format", "audio", "modalities", "prediction", "best_of", "suffix")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


def error_response(err: APIError) -> JSONResponse:
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


# ---- admission: a bounded number generating, a bounded queue, 429 past it ---------------------
class Admission:
    def __init__(self, max_concurrent: int, max_queue: int, retry_after_s: int) -> None:
        self.slots = asyncio.Semaphore(max_concurrent)
        self.limit = max_concurrent + max_queue
        self.retry_after_s = retry_after_s
        self.tickets = 0

    def admit(self) -> None:
        """Take a ticket now (or 429); the ticket is given back by `release`."""
        if self.tickets >= self.limit:
            raise APIError(429, f"server busy: {self.tickets} requests in progress or queued; retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(self.retry_after_s)})
        self.tickets += 1

    def release(self) -> None:
        self.tickets -= 1


# ---- one generation, guarded -------------------------------------------------------------------
@dataclass
class Event:
    """What the formatters turn into response chunks: some text, or the end."""

    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class Outcome:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    guardrail: dict | None = None


@dataclass
class Job:
    model_id: str
    model: ServedModel
    gen: GenRequest | None  # None when the input guard blocked it
    outcome: Outcome = field(default_factory=Outcome)
    blocked_text: str | None = None
    echo: str = ""


def guardrail_info(stage: str, verdict: Verdict) -> dict:
    return {"stage": stage, "action": verdict.action, "category": verdict.category, "reason": verdict.reason}


async def run_job(service: Service, job: Job) -> AsyncIterator[Event]:
    """The engine's deltas passed through the output guard; ends with one finish Event."""
    if job.gen is None:
        yield Event(job.blocked_text or "", None, None)
        yield Event(finish_reason="content_filter")
        return
    guard = service.guard or NoGuard()
    out_filter = guard.output_filter(request_id=job.gen.request_id)
    finish = None
    async with contextlib.aclosing(job.model.engine.generate(job.gen)) as stream:
        async for delta in stream:
            delta: Delta
            job.outcome.completion_tokens += len(delta.token_ids)
            text, verdict = out_filter.push(delta.text)
            if verdict is not None and verdict.blocked:
                job.outcome.guardrail = guardrail_info("output", verdict)
                yield Event(text + verdict.text, delta.logprobs, None)
                finish = "content_filter"
                break  # closing the stream aborts the request in the engine
            if verdict is not None:
                job.outcome.guardrail = guardrail_info("output", verdict)
            if text or delta.logprobs:
                yield Event(text, delta.logprobs, None)
            if delta.finish_reason:
                finish = delta.finish_reason
    if finish != "content_filter":
        tail, verdict = out_filter.finish()
        if verdict is not None:
            job.outcome.guardrail = guardrail_info("output", verdict)
            if verdict.blocked:
                finish = "content_filter"
                tail = tail + verdict.text
        if tail:
            yield Event(tail)
    yield Event(finish_reason=finish or "stop")


# ---- the app -----------------------------------------------------------------------------------
def create_app(service: Service, *, api_key: str | None = None) -> FastAPI:
    cfg = service.cfg
    admission = Admission(cfg.max_concurrent, cfg.max_queue, cfg.retry_after_s)
    app = FastAPI(title="medtune", description="OpenAI-compatible API for a base model and its fine-tune.",
                  docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.admission = admission

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, err: RequestValidationError):
        return error_response(APIError(400, str(err)))

    @app.exception_handler(404)
    async def _not_found(request: Request, _err):
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _method(request: Request, _err):
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}"))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, err: Exception):
        log.exception("internal error")
        return error_response(APIError(500, "internal server error; see the server log", type="server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error_response(APIError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                                               type="authentication_error", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        if service.ready:
            ft = service.finetuned
            return {"status": "ok", "base": str(cfg.base_model), "finetuned": ft.checkpoint if ft else None,
                    "requests": {"admitted": admission.tickets, **service.base.engine.stats()}}
        status = "failed" if service.error else "loading"
        return JSONResponse({"status": status, "error": service.error}, status_code=503)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(mid, m, kind).model_dump() for mid, m, kind in service.models()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for mid, m, kind in service.models():
            if mid == model_id:
                return _model_card(mid, m, kind).model_dump()
        raise APIError(404, f"model {model_id!r} not found; available: {', '.join(mid for mid, _, _ in service.models())}",
                       param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_json(request, cfg.max_request_bytes)
        params = _validate(CHAT_REQUEST, body)
        # The input guard (an encoder pass per message) and the tokenizer are CPU work: off the loop.
        job, stream, include_usage = await asyncio.to_thread(_held_job, service, params, _chat_job)
        return await _respond(service, admission, job, stream, include_usage, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_json(request, cfg.max_request_bytes)
        params = _validate(COMPLETION_REQUEST, body)
        job, stream, include_usage = await asyncio.to_thread(_held_job, service, params, _completion_job)
        return await _respond(service, admission, job, stream, include_usage, chat=False)

    return app


def _model_card(model_id: str, model: ServedModel, kind: str) -> Model:
    return Model(id=model_id, created=model.created, object="model", owned_by="medtune", medtune=model.info(kind))


async def _read_json(request: Request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body is {length} bytes; the limit is {limit}", code="request_too_large")
    raw = await request.body()
    if len(raw) > limit:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {limit}", code="request_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


def _validate(adapter: TypeAdapter, body: dict) -> dict:
    try:
        params = dict(adapter.validate_python(body))
        if "messages" in params:  # the openai types declare Iterable[...]: materialise (and validate) them
            params["messages"] = [dict(m) for m in params["messages"]]
            for m in params["messages"]:
                if m.get("content") is not None and not isinstance(m["content"], str):
                    m["content"] = [dict(part) for part in m["content"]]
        if isinstance(params.get("stop"), list):
            params["stop"] = list(params["stop"])
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"] if not str(p).startswith("CompletionCreateParams")]
        param = ".".join(loc) or None
        raise APIError(400, f"invalid request: {param or 'body'}: {first['msg']}", param=param) from None
    for name in UNSUPPORTED:
        if params.get(name) not in (None, [], {}) and not (name == "response_format" and params[name].get("type") == "text"):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported")
    return params


def _sampling(service: Service, params: dict, prompt_tokens: int, request_id: str) -> dict:
    cfg = service.cfg
    if (params.get("n") or 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported")
    temperature = params.get("temperature")
    temperature = 1.0 if temperature is None else float(temperature)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature {temperature} is out of range [0, 2]", param="temperature")
    top_p = params.get("top_p")
    top_p = 1.0 if top_p is None else float(top_p)
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p {top_p} is out of range (0, 1]", param="top_p")
    asked = params.get("max_completion_tokens") or params.get("max_tokens")
    if asked is not None and asked < 1:
        raise APIError(400, f"max_tokens {asked} must be at least 1", param="max_tokens")
    if asked is not None and asked > cfg.max_tokens_cap:
        raise APIError(413, f"max_tokens {asked} is over this server's cap of {cfg.max_tokens_cap}",
                       param="max_tokens", code="max_tokens_too_large")
    room = cfg.max_model_len - prompt_tokens
    if room < 1:
        raise APIError(413, f"the prompt is {prompt_tokens} tokens; this model's context is {cfg.max_model_len} tokens",
                       param="messages", code="context_length_exceeded")
    if asked is not None and asked > room:
        raise APIError(413, f"the prompt is {prompt_tokens} tokens and max_tokens is {asked}: together over the context of "
                       f"{cfg.max_model_len} tokens; lower max_tokens to {room} or shorten the prompt",
                       param="max_tokens", code="context_length_exceeded")
    stop = params.get("stop")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > 4:
        raise APIError(400, f"at most 4 stop sequences (got {len(stop)})", param="stop")
    seed = params.get("seed")
    return {"request_id": request_id, "max_tokens": min(asked or cfg.default_max_tokens, room), "temperature": temperature,
            "top_p": top_p, "stop": [s for s in stop if s], "seed": seed}


def _resolve(service: Service, model_id: str) -> ServedModel:
    if not service.ready:
        raise APIError(503, "the model is still loading; retry when GET /health returns 200", type="server_error",
                       code="not_ready", headers={"Retry-After": "5"})
    try:
        model = service.resolve_and_acquire(model_id)  # from here the model outlives a hot swap until released
    except ModelNotFound:
        names = ", ".join(mid for mid, _, _ in service.models())
        raise APIError(404, f"model {model_id!r} not found; available: {names}", param="model", code="model_not_found") from None
    return model


@contextlib.contextmanager
def _released_on_error(service: Service, model: ServedModel):
    try:
        yield
    except BaseException:
        service.release(model)
        raise


def _text_of(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") not in ("text", "refusal"):
            raise APIError(400, f"{where}: only text content is supported (got a {part.get('type')!r} part)", param=where)
        parts.append(part.get("text") or part.get("refusal") or "")
    return "".join(parts)


def _held_job(service: Service, params: dict,
              build: Callable[[Service, dict, ServedModel], tuple[Job, bool, bool]]) -> tuple[Job, bool, bool]:
    """`build`'s job on the requested model, which stays held (through a hot swap) until the job
    is done; if building fails (a bad request, a guard error), the model is released at once."""
    model = _resolve(service, params["model"])
    with _released_on_error(service, model):
        return build(service, params, model)


def _chat_job(service: Service, params: dict, model: ServedModel) -> tuple[Job, bool, bool]:
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    guard = service.guard or NoGuard()
    messages = []
    for i, message in enumerate(params["messages"]):
        role = message["role"]
        if role in ("tool", "function"):
            raise APIError(400, f"messages[{i}]: role '{role}' is not supported (no tool calling)", param=f"messages.{i}.role")
        text = _text_of(message.get("content"), f"messages.{i}.content")
        if role in ("system", "developer", "user", "assistant"):
            # every turn the client sends is the client's text, assistant turns included (a forged earlier
            # answer primes the model as well as a request does); the guard tells request from pasted documents
            verdict = guard.check_input(text, request_id=request_id)
            if verdict.blocked:
                job = Job(params["model"], model, None, blocked_text=verdict.text)
                job.outcome.guardrail = guardrail_info("input", verdict)
                return job, bool(params.get("stream")), _include_usage(params)
            text = verdict.text
        messages.append({"role": "system" if role == "developer" else role, "content": text})
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    tokenizer = model.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, f"model {params['model']!r} has no chat template; use /v1/completions", param="model")
    try:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # noqa: BLE001 - templates raise for e.g. role order they do not support
        raise APIError(400, f"the chat template of {params['model']!r} rejected these messages: {err}", param="messages") from None
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sampling = _sampling(service, params, len(prompt_ids), request_id)
    logprobs = None
    if params.get("logprobs"):
        top = params.get("top_logprobs") or 0
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs {top} is out of range [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
        logprobs = top
    elif params.get("top_logprobs"):
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    gen = GenRequest(prompt_ids=prompt_ids, logprobs=logprobs, adapter=model.adapter, **sampling)
    job = Job(params["model"], model, gen)
    job.outcome.prompt_tokens = len(prompt_ids)
    return job, bool(params.get("stream")), _include_usage(params)


def _completion_job(service: Service, params: dict, model: ServedModel) -> tuple[Job, bool, bool]:
    request_id = f"cmpl-{uuid.uuid4().hex}"
    prompt = params["prompt"]
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        elif prompt and all(isinstance(t, int) for t in prompt):
            pass
        else:
            raise APIError(400, "only one prompt per request is supported", param="prompt", code="unsupported")
    tokenizer = model.tokenizer
    if isinstance(prompt, str):
        verdict = (service.guard or NoGuard()).check_input(prompt, request_id=request_id)
        if verdict.blocked:
            job = Job(params["model"], model, None, blocked_text=verdict.text)
            job.outcome.guardrail = guardrail_info("input", verdict)
            return job, bool(params.get("stream")), _include_usage(params)
        prompt = verdict.text
        prompt_ids = tokenizer(prompt)["input_ids"]
    else:
        prompt_ids = list(prompt)
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        prompt = tokenizer.decode(prompt_ids)
    if not prompt_ids:
        raise APIError(400, "prompt must not be empty", param="prompt")
    sampling = _sampling(service, params, len(prompt_ids), request_id)
    logprobs = params.get("logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"logprobs {logprobs} is out of range [0, {MAX_TOP_LOGPROBS}]", param="logprobs")
    if params.get("echo") and logprobs is not None:
        raise APIError(400, "echo together with logprobs (prompt logprobs) is not supported", param="echo", code="unsupported")
    gen = GenRequest(prompt_ids=prompt_ids, logprobs=logprobs, adapter=model.adapter, **sampling)
    job = Job(params["model"], model, gen, echo=prompt if params.get("echo") else "")
    job.outcome.prompt_tokens = len(prompt_ids)
    return job, bool(params.get("stream")), _include_usage(params)


def _include_usage(params: dict) -> bool:
    return bool((params.get("stream_options") or {}).get("include_usage"))


async def _respond(service: Service, admission: Admission, job: Job, stream: bool, include_usage: bool, *, chat: bool):
    with _released_on_error(service, job.model):
        admission.admit()
    request_id = job.gen.request_id if job.gen else f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    fingerprint = f"medtune:{job.model.checkpoint or 'base'}"
    if not stream:
        try:
            async with admission.slots:
                events = [event async for event in run_job(service, job)]
        except EngineError as err:
            raise APIError(500, f"generation failed: {err}", type="server_error") from None
        finally:
            admission.release()
            service.release(job.model)
        text = job.echo + "".join(e.text for e in events)
        finish = events[-1].finish_reason
        lps = [lp for e in events for lp in (e.logprobs or [])]
        usage = CompletionUsage(prompt_tokens=job.outcome.prompt_tokens, completion_tokens=job.outcome.completion_tokens,
                                total_tokens=job.outcome.prompt_tokens + job.outcome.completion_tokens)
        extra = {"medtune": {"guardrail": job.outcome.guardrail, "checkpoint": job.model.checkpoint}}
        if chat:
            choice = Choice(index=0, message=ChatCompletionMessage(role="assistant", content=text), finish_reason=finish,
                            logprobs=_chat_logprobs(lps) if job.gen and job.gen.logprobs is not None else None)
            body = ChatCompletion(id=request_id, object="chat.completion", created=created, model=job.model_id, choices=[choice],
                                  usage=usage, system_fingerprint=fingerprint, **extra)
        else:
            choice = CompletionChoice(index=0, text=text, finish_reason=finish,
                                      logprobs=_completion_logprobs(lps) if job.gen and job.gen.logprobs is not None else None)
            body = Completion(id=request_id, object="text_completion", created=created, model=job.model_id, choices=[choice],
                              usage=usage, system_fingerprint=fingerprint, **extra)
        return JSONResponse(body.model_dump(exclude_none=False))

    async def sse() -> AsyncIterator[str]:
        try:
            async with admission.slots:
                first = True
                if job.echo and not chat:
                    yield _sse(_completion_chunk(request_id, created, job, job.echo, None, None, fingerprint))
                async for event in run_job(service, job):
                    if chat:
                        chunk = _chat_chunk(request_id, created, job, event, first, fingerprint)
                    else:
                        chunk = _completion_chunk(request_id, created, job, event.text, event.finish_reason,
                                                  event.logprobs, fingerprint)
                    first = False
                    yield _sse(chunk)
                if include_usage:
                    usage = CompletionUsage(prompt_tokens=job.outcome.prompt_tokens, completion_tokens=job.outcome.completion_tokens,
                                            total_tokens=job.outcome.prompt_tokens + job.outcome.completion_tokens)
                    cls = ChatCompletionChunk if chat else Completion
                    kind = "chat.completion.chunk" if chat else "text_completion"
                    yield _sse(cls(id=request_id, object=kind, created=created, model=job.model_id, choices=[], usage=usage,
                                   system_fingerprint=fingerprint))
                yield "data: [DONE]\n\n"
        except EngineError as err:
            yield _sse({"error": {"message": f"generation failed: {err}", "type": "server_error", "param": None, "code": None}})
        finally:
            admission.release()
            service.release(job.model)

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})


def _sse(chunk) -> str:
    if isinstance(chunk, dict):
        return f"data: {json.dumps(chunk)}\n\n"
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"


def _chat_chunk(request_id, created, job: Job, event: Event, first: bool, fingerprint: str) -> ChatCompletionChunk:
    delta = ChoiceDelta(role="assistant", content=event.text) if first else ChoiceDelta(content=event.text)
    if event.finish_reason and not event.text:
        delta = ChoiceDelta(role="assistant", content="") if first else ChoiceDelta()
    logprobs = ChunkLogprobs(content=_token_logprobs(event.logprobs)) if event.logprobs else None
    extra = {}
    if event.finish_reason:
        extra["medtune"] = {"guardrail": job.outcome.guardrail, "checkpoint": job.model.checkpoint}
    choice = ChunkChoice(index=0, delta=delta, finish_reason=event.finish_reason, logprobs=logprobs)
    return ChatCompletionChunk(id=request_id, object="chat.completion.chunk", created=created, model=job.model_id,
                               choices=[choice], system_fingerprint=fingerprint, **extra)


def _completion_chunk(request_id, created, job: Job, text: str, finish: str | None, lps, fingerprint: str) -> Completion:
    # The openai type requires finish_reason; mid-stream it is null on the wire, as OpenAI sends it.
    choice = CompletionChoice.model_construct(index=0, text=text, finish_reason=finish,
                                              logprobs=_completion_logprobs(lps) if lps else None)
    extra = {"medtune": {"guardrail": job.outcome.guardrail, "checkpoint": job.model.checkpoint}} if finish else {}
    return Completion(id=request_id, object="text_completion", created=created, model=job.model_id, choices=[choice],
                      system_fingerprint=fingerprint, **extra)


def _token_logprobs(lps: list[TokenLogprob]) -> list[ChatCompletionTokenLogprob]:
    return [
        ChatCompletionTokenLogprob(
            token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode("utf-8")),
            top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode("utf-8"))) for t, v in lp.top],
        )
        for lp in lps
    ]


def _chat_logprobs(lps: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=_token_logprobs(lps))


def _completion_logprobs(lps: list[TokenLogprob]) -> CompletionLogprobs:
    offsets, position = [], 0
    for lp in lps:
        offsets.append(position)
        position += len(lp.token)
    return CompletionLogprobs(tokens=[lp.token for lp in lps], token_logprobs=[lp.logprob for lp in lps],
                              top_logprobs=[dict(lp.top) for lp in lps], text_offset=offsets)
