"""The OpenAI-compatible HTTP layer: FastAPI routes over a `Service`.

Request bodies are validated against the `openai` package's own request types (TypedDicts,
through a pydantic TypeAdapter) and responses are built from its response models, so the
shapes are the ones the official client expects. Extra fields the client may send are
ignored; features this server does not have (tools, images, audio) are refused with 400.

    GET  /health                 200 when engines are loaded, 503 before (no key needed)
    GET  /metrics                Prometheus text format (serving/metrics.py)
    GET  /v1/models              base, finetuned, <run_id>/step_N; extra field `medtune`
    POST /v1/chat/completions    stream or not; guardrails before and after the engine
    POST /v1/completions         raw prompt (no chat template); same guardrails; echo + logprobs gives
                                 the prompt tokens' logprobs (as OpenAI's legacy API and vLLM do)
    POST /tokenize               token ids (and strings) of a prompt or of rendered messages (vLLM's route)

Extensions under vLLM's names, for scoring (medtune eval uses them): `logprob_token_ids` (the
logprobs of these token ids at each generated position, instead of the top k),
`prompt_logprobs` (chat: each prompt token's logprob, in vLLM's shape), `continue_final_message`
and `add_generation_prompt` (chat: score or continue a final assistant turn; its text is
tokenized apart from the prompt, as training tokenizes the answer).

Errors are `{"error": {"message", "type", "param", "code"}}` with 400/401/404/413/429/503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
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
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, TypeAdapter, ValidationError

from medtune.guardrails.base import NoGuard, Verdict
from medtune.serving.engine import Delta, EngineError, EngineRequestError, GenRequest, TokenLogprob
from medtune.serving.service import ModelNotFound, ServedModel, Service

log = logging.getLogger(__name__)

CHAT_REQUEST = TypeAdapter(chat_params.CompletionCreateParamsNonStreaming | chat_params.CompletionCreateParamsStreaming)
COMPLETION_REQUEST = TypeAdapter(completion_params.CompletionCreateParamsNonStreaming | completion_params.CompletionCreateParamsStreaming)
MAX_TOP_LOGPROBS = 20
MAX_LOGPROB_TOKEN_IDS = 64
MAX_N = 8


class Extensions(BaseModel):
    """Request fields beyond the OpenAI API, under the names vLLM's server gives them."""

    model_config = ConfigDict(extra="ignore")
    logprob_token_ids: list[StrictInt] | None = Field(default=None, min_length=1, max_length=MAX_LOGPROB_TOKEN_IDS)
    prompt_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    continue_final_message: StrictBool = False
    add_generation_prompt: StrictBool = True
    structured_outputs: dict | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | None = None
    messages: list[dict] | None = Field(default=None, max_length=256)
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize")
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "audio", "modalities", "prediction", "best_of", "suffix")
STRUCTURED_KEYS = ("choice", "json", "json_object", "regex")  # vLLM's StructuredOutputsParams fields served here
MAX_CHOICES = 64


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
        self.max_concurrent = max_concurrent
        self.limit = max_concurrent + max_queue
        self.retry_after_s = retry_after_s
        self.tickets = 0

    def running(self) -> int:
        return self.max_concurrent - self.slots._value  # noqa: SLF001 - asyncio keeps the free count there

    def queued(self) -> int:
        return max(0, self.tickets - self.running())

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
    prompt_logprobs: list[TokenLogprob | None] | None = None
    created: float = field(default_factory=time.perf_counter)  # when the request arrived (set by the route)
    first_token_at: float | None = None


@dataclass
class Job:
    model_id: str
    model: ServedModel
    gen: GenRequest | None  # None when the input guard blocked it
    outcome: Outcome = field(default_factory=Outcome)
    blocked_text: str | None = None
    echo: str = ""
    index: int = 0  # the choice this job generates (n > 1: one job per choice)


def choice_jobs(job: Job, n: int) -> list[Job]:
    """One job per choice: its own request id, seed (seed + i, so `n` with `seed` repeats), output filter and counts."""
    if n == 1:
        return [job]
    jobs = []
    for i in range(n):
        gen = None
        if job.gen is not None:
            seed = None if job.gen.seed is None else (job.gen.seed + i) % (1 << 63)
            gen = dataclasses.replace(job.gen, request_id=f"{job.gen.request_id}-{i}", seed=seed)
        outcome = Outcome(prompt_tokens=job.outcome.prompt_tokens, guardrail=job.outcome.guardrail, created=job.outcome.created)
        jobs.append(dataclasses.replace(job, gen=gen, outcome=outcome, index=i))
    return jobs


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
            if delta.token_ids and job.outcome.first_token_at is None:
                job.outcome.first_token_at = time.perf_counter()
            job.outcome.completion_tokens += len(delta.token_ids)
            if delta.prompt_logprobs is not None:
                job.outcome.prompt_logprobs = delta.prompt_logprobs
            text, verdict = out_filter.push(delta.text)
            if verdict is not None:
                service.metrics.verdict("output", verdict)
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
            service.metrics.verdict("output", verdict)
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
    metrics = service.metrics
    metrics.in_progress.set_function(admission.running)
    metrics.queue_depth.set_function(admission.queued)

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
        path = request.url.path
        route = path if path in ROUTES else "other"
        if api_key and path != "/health":
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                metrics.requests.labels(route, "", "401").inc()
                return error_response(APIError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                                               type="authentication_error", code="invalid_api_key"))
        started = time.perf_counter()
        response = await call_next(request)
        model = getattr(request.state, "model_id", "")
        metrics.requests.labels(route, model, str(response.status_code)).inc()
        if not isinstance(response, StreamingResponse) or response.status_code != 200 or route not in GENERATION_ROUTES:
            metrics.latency.labels(route, model).observe(time.perf_counter() - started)
        return response  # a generation stream's latency is observed when its last byte is sent

    @app.get("/metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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
        arrived = time.perf_counter()
        body = await _read_json(request, cfg.max_request_bytes)
        request.state.model_id = _model_label(service, body)
        params = _validate(CHAT_REQUEST, body)
        _choices(params)
        # The input guard (an encoder pass per message) and the tokenizer are CPU work: off the loop.
        job, stream, include_usage = await asyncio.to_thread(_held_job, service, params, _chat_job)
        job.outcome.created = arrived  # TTFT and latency count the guard and the template too
        return await _respond(service, admission, job, stream, include_usage, chat=True, n=_choices(params))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _read_json(request, cfg.max_request_bytes)
        try:
            req = TokenizeRequest.model_validate(body)
        except ValidationError as err:
            raise _validation_error(err) from None
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        model = _resolve(service, req.model)
        try:
            return await asyncio.to_thread(_tokenize, model, req, cfg.max_model_len)
        finally:
            service.release(model)

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrived = time.perf_counter()
        body = await _read_json(request, cfg.max_request_bytes)
        request.state.model_id = _model_label(service, body)
        params = _validate(COMPLETION_REQUEST, body)
        _choices(params)
        job, stream, include_usage = await asyncio.to_thread(_held_job, service, params, _completion_job)
        job.outcome.created = arrived
        return await _respond(service, admission, job, stream, include_usage, chat=False, n=_choices(params))

    return app


def _model_label(service: Service, body: dict) -> str:
    """The model id as a metrics label: one of the served ids, else "unknown" (labels must stay few)."""
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) and model in {mid for mid, _, _ in service.models()} else "unknown"


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


def _tokenize(model: ServedModel, req: TokenizeRequest, max_model_len: int) -> dict:
    tokenizer = model.tokenizer
    if req.messages is not None:
        messages = [{"role": str(m.get("role")), "content": _text_of(m.get("content"), f"messages.{i}.content")}
                    for i, m in enumerate(req.messages)]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt, tokenize=False)
        except Exception as err:  # noqa: BLE001
            raise APIError(400, f"the chat template of {req.model!r} rejected these messages: {err}", param="messages") from None
        ids = tokenizer(text, add_special_tokens=bool(req.add_special_tokens))["input_ids"]
    else:
        ids = tokenizer(req.prompt, add_special_tokens=True if req.add_special_tokens is None else req.add_special_tokens)["input_ids"]
    out = {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}
    if req.return_token_strs:
        out["token_strs"] = [tokenizer.decode([t]) for t in ids]
    return out


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"] if not str(p).startswith("CompletionCreateParams")]
    param = ".".join(loc) or None
    return APIError(400, f"invalid request: {param or 'body'}: {first['msg']}", param=param)


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
        params["_ext"] = Extensions.model_validate(body)
    except ValidationError as err:
        raise _validation_error(err) from None
    for name in UNSUPPORTED:
        if params.get(name) not in (None, [], {}):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported")
    return params


def _structured(params: dict, ext: Extensions, engine) -> dict | None:
    """The output constraint: OpenAI's `response_format` (json_object, json_schema) or vLLM's `structured_outputs`
    (choice, json, json_object, regex), as vLLM's StructuredOutputsParams fields; 400 for what the engine cannot do."""
    found = {}
    fmt = params.get("response_format")
    if fmt:
        kind = fmt.get("type")
        if kind == "json_object":
            found["json_object"] = True
        elif kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise APIError(400, "response_format.json_schema.schema must be a JSON schema object", param="response_format")
            found["json"] = schema
        elif kind != "text":
            raise APIError(400, f"response_format type {kind!r} is not supported", param="response_format")
    if ext.structured_outputs:
        if found:
            raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
        given = {k: v for k, v in ext.structured_outputs.items() if v not in (None, False)}
        unknown = sorted(set(given) - set(STRUCTURED_KEYS))
        if unknown or len(given) != 1:
            raise APIError(400, f"structured_outputs takes exactly one of {', '.join(STRUCTURED_KEYS)}"
                                + (f" (unknown: {', '.join(unknown)})" if unknown else ""), param="structured_outputs")
        found = given
        choice = found.get("choice")
        if choice is not None and (not isinstance(choice, list) or not 0 < len(choice) <= MAX_CHOICES
                                   or not all(isinstance(c, str) and c for c in choice)):
            raise APIError(400, f"structured_outputs.choice must be 1 to {MAX_CHOICES} non-empty strings", param="structured_outputs")
        if "regex" in found and not isinstance(found["regex"], str):
            raise APIError(400, "structured_outputs.regex must be a string", param="structured_outputs")
        if "json" in found and not isinstance(found["json"], (dict, str)):
            raise APIError(400, "structured_outputs.json must be a JSON schema", param="structured_outputs")
    if not found:
        return None
    kind = next(iter(found))
    if kind not in engine.structured_kinds:
        raise APIError(400, f"this server's {type(engine).__name__} cannot constrain output by {kind!r} "
                            f"(it can: {', '.join(engine.structured_kinds) or 'nothing'}); serve with the vllm engine",
                       param="response_format" if fmt else "structured_outputs", code="unsupported")
    return found


def _sampling(service: Service, params: dict, prompt_tokens: int, request_id: str) -> dict:
    cfg = service.cfg
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
            service.metrics.verdict("input", verdict)
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
    ext: Extensions = params["_ext"]
    final = None
    if ext.continue_final_message:
        if ext.add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt: false", param="add_generation_prompt")
        if messages[-1]["role"] != "assistant":
            raise APIError(400, "continue_final_message needs an assistant message last", param="messages")
        messages, final = messages[:-1], messages[-1]["content"]
        if not messages:
            raise APIError(400, "continue_final_message needs a message before the assistant's", param="messages")
    try:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=ext.add_generation_prompt or final is not None,
                                               tokenize=False)
    except Exception as err:  # noqa: BLE001 - templates raise for e.g. role order they do not support
        raise APIError(400, f"the chat template of {params['model']!r} rejected these messages: {err}", param="messages") from None
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if final:  # the answer so far, tokenized apart from the prompt as training tokenizes it
        prompt_ids += tokenizer(final, add_special_tokens=False)["input_ids"]
    sampling = _sampling(service, params, len(prompt_ids), request_id)
    logprobs = None
    if params.get("logprobs"):
        top = params.get("top_logprobs") or 0
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs {top} is out of range [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
        logprobs = top
    elif params.get("top_logprobs"):
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if ext.prompt_logprobs is not None and params.get("stream"):
        raise APIError(400, "prompt_logprobs is not supported with stream: true", param="prompt_logprobs", code="unsupported")
    gen = GenRequest(prompt_ids=prompt_ids, logprobs=logprobs, adapter=model.adapter,
                     logprob_token_ids=_token_ids(ext, logprobs, tokenizer), prompt_logprobs=ext.prompt_logprobs,
                     structured=_structured(params, ext, model.engine), **sampling)
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
        service.metrics.verdict("input", verdict)
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
    prompt_logprobs = None
    if params.get("echo") and logprobs is not None:  # the prompt's own logprobs, before the completion's
        if params.get("stream"):
            raise APIError(400, "echo with logprobs is not supported with stream: true", param="echo", code="unsupported")
        prompt_logprobs = logprobs
    gen = GenRequest(prompt_ids=prompt_ids, logprobs=logprobs, adapter=model.adapter, prompt_logprobs=prompt_logprobs,
                     logprob_token_ids=_token_ids(params["_ext"], logprobs, tokenizer),
                     structured=_structured(params, params["_ext"], model.engine), **sampling)
    job = Job(params["model"], model, gen, echo=prompt if params.get("echo") else "")
    job.outcome.prompt_tokens = len(prompt_ids)
    return job, bool(params.get("stream")), _include_usage(params)


def _token_ids(ext: Extensions, logprobs: int | None, tokenizer) -> list[int] | None:
    if not ext.logprob_token_ids:
        return None
    if logprobs is None:
        raise APIError(400, "logprob_token_ids needs logprobs", param="logprob_token_ids")
    vocab = len(tokenizer)
    if any(not 0 <= t < vocab for t in ext.logprob_token_ids):
        raise APIError(400, f"logprob_token_ids must be in [0, {vocab})", param="logprob_token_ids")
    return list(ext.logprob_token_ids)


def _choices(params: dict) -> int:
    n = params.get("n")
    if n is not None and not 1 <= n <= MAX_N:
        raise APIError(400, f"n {n} is out of range [1, {MAX_N}]", param="n")
    return n or 1


def _include_usage(params: dict) -> bool:
    return bool((params.get("stream_options") or {}).get("include_usage"))


async def _respond(service: Service, admission: Admission, job: Job, stream: bool, include_usage: bool, *, chat: bool,
                   n: int = 1):
    with _released_on_error(service, job.model):
        admission.admit()
    request_id = job.gen.request_id if job.gen else f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    fingerprint = f"medtune:{job.model.checkpoint or 'base'}"
    jobs = choice_jobs(job, n)

    def usage() -> CompletionUsage:
        done = sum(j.outcome.completion_tokens for j in jobs)
        return CompletionUsage(prompt_tokens=job.outcome.prompt_tokens, completion_tokens=done,
                               total_tokens=job.outcome.prompt_tokens + done)

    if not stream:
        async def collect(j: Job) -> list[Event]:
            return [event async for event in run_job(service, j)]

        try:
            async with admission.slots:  # the n choices of one request share its slot and run together
                results = await asyncio.gather(*(collect(j) for j in jobs))
        except EngineRequestError as err:
            raise APIError(400, f"the engine refused the request: {err}") from None
        except EngineError as err:
            raise APIError(500, f"generation failed: {err}", type="server_error") from None
        finally:
            admission.release()
            service.release(job.model)
            _observe(service, jobs, chat)
        extra = {"medtune": {"guardrail": jobs[0].outcome.guardrail, "checkpoint": job.model.checkpoint}}
        if n > 1:
            extra["medtune"]["guardrails"] = [j.outcome.guardrail for j in jobs]
        choices = []
        for j, events in zip(jobs, results):
            text = j.echo + "".join(e.text for e in events)
            finish = events[-1].finish_reason
            lps = [lp for e in events for lp in (e.logprobs or [])]
            wants_lps = j.gen is not None and j.gen.logprobs is not None
            if chat:
                choices.append(Choice(index=j.index, message=ChatCompletionMessage(role="assistant", content=text),
                                      finish_reason=finish, logprobs=_chat_logprobs(lps) if wants_lps else None))
            else:
                first = ""
                if j.gen and j.gen.prompt_logprobs is not None:  # echo: the prompt's tokens first, the first one unscored
                    lps = [*(j.outcome.prompt_logprobs or []), *lps]
                    first = job.model.tokenizer.decode(j.gen.prompt_ids[:1])
                choices.append(CompletionChoice(index=j.index, text=text, finish_reason=finish,
                                                logprobs=_completion_logprobs(lps, first) if wants_lps else None))
        if chat:
            if job.gen and job.gen.prompt_logprobs is not None:
                extra["prompt_logprobs"] = _vllm_prompt_logprobs(jobs[0].outcome.prompt_logprobs, job.gen.prompt_ids)
            body = ChatCompletion(id=request_id, object="chat.completion", created=created, model=job.model_id, choices=choices,
                                  usage=usage(), system_fingerprint=fingerprint, **extra)
        else:
            body = Completion(id=request_id, object="text_completion", created=created, model=job.model_id, choices=choices,
                              usage=usage(), system_fingerprint=fingerprint, **extra)
        return JSONResponse(body.model_dump(exclude_none=False))

    async def events() -> AsyncIterator[tuple[Job, Event]]:
        """The choices' events as they come, interleaved (one job: in order)."""
        if n == 1:
            async for event in run_job(service, job):
                yield job, event
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(j: Job) -> None:
            try:
                async for event in run_job(service, j):
                    await queue.put((j, event))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                await queue.put(err)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(j)) for j in jobs]
        try:
            left = len(tasks)
            while left:
                item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def sse() -> AsyncIterator[str]:
        try:
            async with admission.slots:
                started = set()
                if job.echo and not chat:
                    for j in jobs:
                        yield _sse(_completion_chunk(request_id, created, j, j.echo, None, None, fingerprint))
                async with contextlib.aclosing(events()) as stream_events:
                    async for j, event in stream_events:
                        if chat:
                            chunk = _chat_chunk(request_id, created, j, event, j.index not in started, fingerprint)
                        else:
                            chunk = _completion_chunk(request_id, created, j, event.text, event.finish_reason,
                                                      event.logprobs, fingerprint)
                        started.add(j.index)
                        yield _sse(chunk)
                if include_usage:
                    cls = ChatCompletionChunk if chat else Completion
                    kind = "chat.completion.chunk" if chat else "text_completion"
                    yield _sse(cls(id=request_id, object=kind, created=created, model=job.model_id, choices=[], usage=usage(),
                                   system_fingerprint=fingerprint))
                yield "data: [DONE]\n\n"
        except EngineError as err:
            yield _sse({"error": {"message": f"generation failed: {err}", "type": "server_error", "param": None, "code": None}})
        finally:
            admission.release()
            service.release(job.model)
            _observe(service, jobs, chat, stream=True)

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})


def _observe(service: Service, jobs: list[Job], chat: bool, stream: bool = False) -> None:
    m, now = service.metrics, time.perf_counter()
    job, o = jobs[0], jobs[0].outcome
    if stream:  # a stream's latency to its last byte (the middleware saw only the headers)
        m.latency.labels("/v1/chat/completions" if chat else "/v1/completions", job.model_id).observe(now - o.created)
    done = sum(j.outcome.completion_tokens for j in jobs)
    m.tokens.labels(job.model_id, "prompt").inc(o.prompt_tokens)
    m.tokens.labels(job.model_id, "completion").inc(done)
    firsts = [j.outcome.first_token_at for j in jobs if j.outcome.first_token_at is not None]
    if firsts:
        m.ttft.labels(job.model_id).observe(min(firsts) - o.created)
        if done > 1 and now > o.created:
            m.tokens_per_s.labels(job.model_id).observe(done / (now - o.created))


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
    choice = ChunkChoice(index=job.index, delta=delta, finish_reason=event.finish_reason, logprobs=logprobs)
    return ChatCompletionChunk(id=request_id, object="chat.completion.chunk", created=created, model=job.model_id,
                               choices=[choice], system_fingerprint=fingerprint, **extra)


def _completion_chunk(request_id, created, job: Job, text: str, finish: str | None, lps, fingerprint: str) -> Completion:
    # The openai type requires finish_reason; mid-stream it is null on the wire, as OpenAI sends it.
    choice = CompletionChoice.model_construct(index=job.index, text=text, finish_reason=finish,
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


def _completion_logprobs(lps: list[TokenLogprob | None], first: str = "") -> CompletionLogprobs:
    """OpenAI's legacy shape; with echo the first prompt token (`first`) has no logprob (null), as OpenAI and vLLM send it."""
    offsets, position, tokens = [], 0, []
    for lp in lps:
        offsets.append(position)
        token = lp.token if lp is not None else first
        tokens.append(token)
        position += len(token)
    # model_construct: the openai type declares List[float], the wire format allows the leading null
    return CompletionLogprobs.model_construct(tokens=tokens, token_logprobs=[lp.logprob if lp else None for lp in lps],
                                              top_logprobs=[dict(lp.top) if lp else None for lp in lps], text_offset=offsets)


def _vllm_prompt_logprobs(lps: list[TokenLogprob | None] | None, prompt_ids: list[int]) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token null (the first) or {token id: {logprob, rank, decoded_token}},
    the prompt's own token first, then the top k."""
    out: list[dict | None] = []
    for token_id, lp in zip(prompt_ids, lps or [None] * len(prompt_ids)):
        if lp is None:
            out.append(None)
            continue
        entry = {str(token_id): {"logprob": lp.logprob, "rank": None, "decoded_token": lp.token}}
        for rank, (tid, (text, value)) in enumerate(zip(lp.top_ids, lp.top), start=1):
            entry.setdefault(str(tid), {"logprob": value, "rank": rank, "decoded_token": text})
            if str(tid) == str(token_id):
                entry[str(tid)]["rank"] = rank
        out.append(entry)
    return out
