"""The engine interface the HTTP layer talks to, and its transformers implementation.

An engine holds one set of weights and, when it supports LoRA, any number of adapters on top.
`generate` streams `Delta`s for one request; cancelling the consuming task (client gone)
stops the work. Two implementations:

  VLLMEngine (serving/vllm_engine.py)  vLLM's AsyncLLM: continuous batching, LoRA hot-add
  HFEngine   (here)                    plain transformers + peft, one request at a time; for
                                       machines where vLLM cannot be installed, and tests

Token ids in, text out: the caller renders the chat template and tokenizes, so it can count
tokens and reject an over-long prompt before anything reaches the engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter on shared storage, known to the engine by name and a positive int id."""

    name: str
    int_id: int
    path: str


@dataclass
class GenRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k
    logprob_token_ids: list[int] | None = None  # with logprobs: these tokens' logprobs instead of the top k
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's logprob (and the top k), first Delta
    structured: dict | None = None  # vLLM's StructuredOutputsParams fields: {"choice": [...]}, {"json": schema}, ...
    adapter: Adapter | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    token_id: int = -1
    top_ids: tuple[int, ...] = ()  # the ids of `top`, same order


@dataclass
class Delta:
    """New output since the previous Delta of the same request."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" on the last delta
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first delta only; None for the first prompt token


class EngineError(Exception):
    """The engine could not do what was asked (bad adapter, engine dead); message is user-safe."""


class EngineRequestError(EngineError):
    """The engine refused this request's parameters (e.g. a JSON schema it cannot compile): the client's error."""


class Engine(ABC):
    supports_lora: bool = False
    structured_kinds: tuple[str, ...] = ()  # the structured-output constraints it can apply

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    def generate(self, request: GenRequest) -> AsyncIterator[Delta]: ...

    async def add_adapter(self, adapter: Adapter) -> None:
        raise EngineError(f"{type(self).__name__} does not serve LoRA adapters")

    async def remove_adapter(self, adapter: Adapter) -> None:
        raise EngineError(f"{type(self).__name__} does not serve LoRA adapters")

    async def shutdown(self) -> None:
        return None

    def stats(self) -> dict:
        """Counters for /health: requests running in the engine, requests stopped early."""
        return {}


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def make_engine(kind: str, model_path: str, cfg, *, enable_lora: bool, max_lora_rank: int | None = None) -> Engine:
    if kind == "vllm":
        from medtune.serving.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, cfg, enable_lora=enable_lora, max_lora_rank=max_lora_rank)
    if kind == "transformers":
        return HFEngine(model_path, cfg, enable_lora=enable_lora)
    raise EngineError(f"unknown engine {kind!r}: use vllm or transformers")


class HFEngine(Engine):
    """transformers + peft, a hand-written incremental decode loop in a worker thread.

    Written by hand (rather than `model.generate` with a streamer) because the loop must yield
    token ids with their logprobs, stop on stop strings mid-token, and stop when the consumer
    goes away; requests run one at a time (a lock), adapters switch per request.
    """

    supports_lora = True
    structured_kinds = ("choice",)  # a token trie over the choices; grammars need vLLM

    def __init__(self, model_path: str, cfg, *, enable_lora: bool) -> None:
        self.model_path = model_path
        self.cfg = cfg
        self.enable_lora = enable_lora
        self.model = None
        self.tokenizer = None
        self._lock = asyncio.Lock()
        self._adapters: dict[str, Adapter] = {}
        self.running = 0
        self.cancelled = 0  # requests whose consumer went away before the end

    def stats(self) -> dict:
        return {"running": self.running, "cancelled": self.cancelled}

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(self.cfg.dtype, "auto")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        model.eval()
        self.model = model

    async def add_adapter(self, adapter: Adapter) -> None:
        async with self._lock:
            await asyncio.to_thread(self._add_adapter, adapter)

    def _add_adapter(self, adapter: Adapter) -> None:
        from peft import PeftModel

        try:
            if not hasattr(self.model, "peft_config"):
                self.model = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=adapter.name)
            else:
                self.model.load_adapter(adapter.path, adapter_name=adapter.name)
        except Exception as err:  # noqa: BLE001 - any load failure means "refuse this adapter"
            raise EngineError(f"cannot load adapter {adapter.name} from {adapter.path}: {err}") from None
        self.model.eval()
        self._adapters[adapter.name] = adapter

    async def remove_adapter(self, adapter: Adapter) -> None:
        async with self._lock:
            if adapter.name in self._adapters and hasattr(self.model, "delete_adapter"):
                await asyncio.to_thread(self.model.delete_adapter, adapter.name)
            self._adapters.pop(adapter.name, None)

    async def generate(self, request: GenRequest) -> AsyncIterator[Delta]:
        if request.adapter is not None and request.adapter.name not in self._adapters:
            raise EngineError(f"adapter {request.adapter.name} is not loaded")
        async with self._lock:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            cancel = threading.Event()

            def emit(item) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, item)

            worker = asyncio.create_task(asyncio.to_thread(self._decode, request, emit, cancel))
            self.running += 1
            finished = False
            try:
                while True:
                    item = await queue.get()
                    if item is None:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if item.finish_reason:
                        finished = True
                        break
            finally:
                self.running -= 1
                if not finished:
                    self.cancelled += 1
                cancel.set()
                await asyncio.shield(worker)

    def _decode(self, request: GenRequest, emit, cancel: threading.Event) -> None:
        try:
            self._decode_loop(request, emit, cancel)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            emit(err)
        finally:
            emit(None)

    def _decode_loop(self, request: GenRequest, emit, cancel: threading.Event) -> None:
        import contextlib

        import torch

        model, tok = self.model, self.tokenizer
        generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        if hasattr(model, "peft_config"):
            if request.adapter is None:
                adapter_ctx = model.disable_adapter()
            else:
                model.set_adapter(request.adapter.name)
                adapter_ctx = contextlib.nullcontext()
        else:
            adapter_ctx = contextlib.nullcontext()
        eos = {tok.eos_token_id}
        configured = getattr(model.generation_config, "eos_token_id", None)
        eos.update(configured if isinstance(configured, list) else [configured])
        eos.discard(None)
        ids = torch.tensor([request.prompt_ids])
        past = None
        out_ids: list[int] = []
        sent_text = ""
        choices = None
        if request.structured and "choice" in request.structured:
            choices = [tok(c, add_special_tokens=False)["input_ids"] for c in request.structured["choice"]]
        with torch.inference_mode(), adapter_ctx:
            while not cancel.is_set():
                result = model(input_ids=ids, past_key_values=past, use_cache=True)
                prompt_lps = None
                if past is None and request.prompt_logprobs is not None:
                    prompt_lps = self._prompt_logprobs(result.logits[0, :-1].float(), request.prompt_ids, request.prompt_logprobs)
                past = result.past_key_values
                logits = result.logits[0, -1].float()
                logprobs_all = torch.log_softmax(logits, dim=-1)
                if choices is not None:  # only tokens that continue some choice
                    mask = torch.full_like(logits, float("-inf"))
                    mask[list({c[len(out_ids)] for c in _continuing(choices, out_ids)})] = 0.0
                    logits = logits + mask
                token = self._sample(logits, request, generator)
                out_ids.append(token)
                finish = None
                if token in eos:
                    finish = "stop"
                elif choices is not None and out_ids in choices and not _continuing(choices, out_ids):
                    finish = "stop"  # a whole choice, and no longer one it could still become
                text = tok.decode(out_ids, skip_special_tokens=True)
                if text.endswith("\ufffd") and finish is None:
                    new_text = ""  # half a multi-byte character: wait for the rest
                else:
                    new_text = text[len(sent_text):]
                for stop in request.stop:
                    where = text.find(stop, max(0, len(sent_text) - len(stop)))
                    if stop and where != -1:
                        new_text = text[len(sent_text):where]
                        finish = "stop"
                        break
                if finish is None and len(out_ids) >= request.max_tokens:
                    finish = "length"
                lp = None
                if request.logprobs is not None:
                    lp = [self._token_logprob(logprobs_all, token, request.logprobs, request.logprob_token_ids)]
                sent_text += new_text
                emit(Delta(new_text, [token], lp, finish, prompt_lps))
                if finish:
                    return
                ids = torch.tensor([[token]])

    def _prompt_logprobs(self, logits, prompt_ids: list[int], k: int) -> list[TokenLogprob | None]:
        """Each prompt token's logprob given the ones before it (row i of `logits` predicts token i + 1)."""
        import torch

        logprobs = torch.log_softmax(logits, dim=-1)
        return [None, *(self._token_logprob(logprobs[row], token, k) for row, token in enumerate(prompt_ids[1:]))]

    def _token_logprob(self, logprobs, token: int, k: int, token_ids: list[int] | None = None) -> TokenLogprob:
        """One position: the token's logprob and the top k (or the asked-for ids, in order)."""
        import torch

        tok = self.tokenizer
        top_ids = list(token_ids) if token_ids else [int(i) for i in torch.topk(logprobs, k).indices] if k > 0 else []
        top = tuple((tok.decode([t]), float(logprobs[t])) for t in top_ids)
        return TokenLogprob(tok.decode([token]), float(logprobs[token]), top, token, tuple(top_ids))

    @staticmethod
    def _sample(logits, request: GenRequest, generator) -> int:
        import torch

        if request.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < request.top_p
            sorted_probs = sorted_probs * keep
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _continuing(choices: list[list[int]], out_ids: list[int]) -> list[list[int]]:
    """The choices that `out_ids` is a proper prefix of."""
    return [c for c in choices if len(c) > len(out_ids) and c[:len(out_ids)] == out_ids]


def model_vocab_size(model_path: str | Path) -> int | None:
    import json

    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    return data.get("vocab_size") or data.get("text_config", {}).get("vocab_size")
