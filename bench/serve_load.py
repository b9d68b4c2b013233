"""Serving load benchmark: `base` and `finetuned` through the full stack, against the bare vLLM engine.

    python bench/serve_load.py                       # SmolLM2-135M + the LATEST checkpoint in ./storage
    python bench/serve_load.py --clients 1,4,8 --requests 4 --max-tokens 128 --guardrails default

Workload: real PQA-L questions with their abstracts (../shared/datasets/pubmedqa, the chat app's
user message), or short questions without it (--prompts short), greedy, streaming.

Baselines, in this process with the service's engine arguments: vLLM's AsyncLLM on the base
(no LoRA), and vLLM's AsyncLLM with LoRA enabled serving the checkpoint as an adapter (the way
`finetuned` was served before merged mode). Then the full stack: `medtune serve` (Ray Serve,
FastAPI, guardrails, the engines in the serving mode `lora_mode` picks) as a subprocess on
127.0.0.1, N concurrent streaming clients through the official `openai` client, asking for
`base` and then `finetuned`. Prints aggregate completion tokens/s, TTFT p50/p95 and the ratios:

    stack finetuned / stack base at each concurrency      target >= 0.8, TTFT p50 within 1.5x
    stack base / bare base                                target >= 0.85
    stack finetuned / bare adapter                        what merged mode buys on this machine

Bounded: clients x requests streams per phase, each at most --max-tokens; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets" / "pubmedqa"
SHORT_QUESTIONS = [
    "Does regular aspirin use lower the risk of a second heart attack?",
    "Is metformin safe to continue before a CT scan with contrast?",
    "Can vitamin D supplements prevent fractures in older adults?",
    "Does early mobilisation shorten hospital stay after hip surgery?",
    "Is there an association between sleep apnoea and atrial fibrillation?",
    "Do statins reduce mortality in patients over eighty?",
    "Can probiotics prevent antibiotic-associated diarrhoea in children?",
    "Does smoking cessation improve outcomes after lung cancer surgery?",
]


def user_messages(kind: str, count: int = 8) -> list[str]:
    """The user turns the clients send: PQA-L question + abstract (the first `count` official test ids), or short ones."""
    if kind == "short":
        return SHORT_QUESTIONS
    from medtune.training.prompts import user_message

    items = json.loads((SHARED / "ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = sorted(json.loads((SHARED / "test_ground_truth.json").read_text(encoding="utf-8")))
    return [user_message(items[i]["QUESTION"], " ".join(items[i]["CONTEXTS"])) for i in test_ids[:count]]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarise(name: str, clients: int, wall: float, records: list[tuple[float, int]]) -> dict:
    tokens = sum(n for _, n in records)
    ttfts = [t for t, _ in records]
    return {"phase": name, "clients": clients, "requests": len(records), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50_ms": 1000 * percentile(ttfts, 0.5), "ttft_p95_ms": 1000 * percentile(ttfts, 0.95)}


USERS: list[str] = SHORT_QUESTIONS


def messages(i: int) -> list[dict]:
    from medtune.training.prompts import SYSTEM_PROMPT

    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": USERS[i % len(USERS)]}]


# ---- baseline: the bare engine ------------------------------------------------------------------
async def bare_phase(cfg, clients_list: list[int], requests: int, max_tokens: int, adapter: Path | None = None) -> list[dict]:
    """The bare engine on the base, or (adapter) LoRA-enabled with the checkpoint as an adapter, rank sized to it."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind

    from medtune.serving.config import lora_rank_for
    from medtune.serving.service import _adapter_rank
    from medtune.serving.vllm_engine import VLLMEngine

    rank = lora_rank_for(_adapter_rank(adapter) or 16) if adapter else None
    wrapper = VLLMEngine(cfg.base_model, cfg, enable_lora=adapter is not None, max_lora_rank=rank)  # the service's engine args
    await wrapper.start()
    engine = wrapper.engine
    lora = LoRARequest(lora_name="bench", lora_int_id=1, lora_path=str(adapter)) if adapter else None
    tok = AutoTokenizer.from_pretrained(str(adapter or cfg.base_model))
    prompts = [tok(tok.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
               for i in range(len(USERS))]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)
    counter = iter(range(10**9))
    name = f"bare adapter r{rank}" if adapter else "bare base"

    async def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        ttft, n = None, 0
        async for out in engine.generate({"prompt_token_ids": prompts[i % len(prompts)]}, params, f"bare-{next(counter)}",
                                         lora_request=lora):
            if ttft is None and out.outputs[0].token_ids:
                ttft = time.perf_counter() - start
            n += len(out.outputs[0].token_ids)
        return ttft or 0.0, n

    async def client(c: int) -> list:
        return [await one(c + r) for r in range(requests)]

    await one(0)  # warm-up
    results = []
    for clients in clients_list:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client(c) for c in range(clients)))
        results.append(summarise(name, clients, time.perf_counter() - start, [r for rs in per_client for r in rs]))
        print(f"  {name} clients={clients}: {results[-1]['tok_s']:.1f} tok/s", flush=True)
    await wrapper.shutdown()
    return results


# ---- the full stack ---------------------------------------------------------------------------
async def stack_phase(url: str, clients_list: list[int], requests: int, max_tokens: int, model: str) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key=os.environ.get("MEDTUNE_API_KEY", "unused"), max_retries=0, timeout=300)

    async def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        ttft, n = None, 0
        stream = await client.chat.completions.create(model=model, messages=messages(i), max_tokens=max_tokens, temperature=0,
                                                      stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - start
            if chunk.usage:
                n = chunk.usage.completion_tokens
        return ttft or 0.0, n

    async def worker(c: int) -> list:
        return [await one(c + r) for r in range(requests)]

    await one(0)  # warm-up
    results = []
    for clients in clients_list:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(worker(c) for c in range(clients)))
        results.append(summarise(f"stack {model}", clients, time.perf_counter() - start, [r for rs in per_client for r in rs]))
        print(f"  stack {model} clients={clients}: {results[-1]['tok_s']:.1f} tok/s", flush=True)
    await client.close()
    return results


def main() -> int:
    global USERS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "storage/models/smollm2-135m-instruct"))
    parser.add_argument("--storage", default=str(REPO / "storage"), help="checkpoints for `finetuned` (the stack loads LATEST)")
    parser.add_argument("--config", default="serving/configs/smollm2.yaml")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--requests", type=int, default=3, help="sequential requests per client")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--guardrails", default="default")
    parser.add_argument("--prompts", choices=["pubmedqa", "short"], default="pubmedqa" if (SHARED / "ori_pqal.json").is_file() else "short",
                        help="PQA-L questions with their abstracts (default where ../shared has them) or short questions")
    parser.add_argument("--lora-mode", choices=["auto", "adapter", "merged"], default=None, help="the stack's lora_mode (default: the config's, auto)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"{args.model}: no model (run `make model`)")
    from medtune.serving.config import load_config, resolved_lora_mode
    from medtune.training.checkpoints import latest_checkpoint

    ckpt = latest_checkpoint(Path(args.storage))
    if ckpt is None:
        raise SystemExit(f"{args.storage}: no checkpoint for `finetuned` (run `make train`)")
    clients_list = [int(c) for c in args.clients.split(",")]
    USERS = user_messages(args.prompts)
    cfg = load_config(args.config, {"base_model": args.model, "storage": args.storage, "lora_mode": args.lora_mode})
    # Ray gives the serving replica OMP_NUM_THREADS = its CPU reservation; the bare engine gets
    # the same, so the phases differ only by the stack in front of the engine.
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(cfg.cpus_per_replica)))
    print(f"workload: {len(USERS)} {args.prompts} prompts; clients {clients_list}, {args.requests} requests each, "
          f"max_tokens {args.max_tokens}; checkpoint {ckpt}", flush=True)
    bare = asyncio.run(bare_phase(cfg, clients_list, args.requests, args.max_tokens))
    bare_adapter = asyncio.run(bare_phase(cfg, clients_list, args.requests, args.max_tokens, adapter=ckpt))
    from medtune.serving.launch import serve_process

    mode = resolved_lora_mode(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"medtune stack (Ray Serve + FastAPI + guardrails={args.guardrails}, lora_mode {mode}) on 127.0.0.1", flush=True)
        serve_args = ["--config", args.config, "--base-model", args.model, "--storage", args.storage, "--guardrails", args.guardrails,
                      *(["--lora-mode", args.lora_mode] if args.lora_mode else [])]
        with serve_process(serve_args, log=Path(tmp) / "serve.log") as server:
            stack_base = asyncio.run(stack_phase(server.url, clients_list, args.requests, args.max_tokens, "base"))
            stack_ft = asyncio.run(stack_phase(server.url, clients_list, args.requests, args.max_tokens, "finetuned"))

    print(f"\n{'phase':<22}{'clients':>8}{'requests':>9}{'tokens':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p95':>10}")
    for row in bare + bare_adapter + stack_base + stack_ft:
        print(f"{row['phase']:<22}{row['clients']:>8}{row['requests']:>9}{row['tokens']:>8}{row['tok_s']:>9.1f}"
              f"{row['ttft_p50_ms']:>8.0f}ms{row['ttft_p95_ms']:>8.0f}ms")
    print()
    ratios = {}
    for b, ba, sb, sf in zip(bare, bare_adapter, stack_base, stack_ft):
        c = b["clients"]
        ratios[f"finetuned/base@{c}"] = sf["tok_s"] / sb["tok_s"]
        ratios[f"finetuned/base TTFT p50@{c}"] = sf["ttft_p50_ms"] / sb["ttft_p50_ms"]
        ratios[f"stack/bare base@{c}"] = sb["tok_s"] / b["tok_s"]
        ratios[f"stack finetuned/bare adapter@{c}"] = sf["tok_s"] / ba["tok_s"]
        ratios[f"bare adapter/bare base@{c}"] = ba["tok_s"] / b["tok_s"]
        print(f"{c} clients: finetuned / base through the stack {ratios[f'finetuned/base@{c}']:.2f} (target >= 0.8), "
              f"TTFT p50 {ratios[f'finetuned/base TTFT p50@{c}']:.2f}x (target <= 1.5); stack / bare base "
              f"{ratios[f'stack/bare base@{c}']:.2f} (target >= 0.85); stack finetuned / bare adapter "
              f"{ratios[f'stack finetuned/bare adapter@{c}']:.2f}; bare adapter / bare base {ratios[f'bare adapter/bare base@{c}']:.2f}")
    if len(clients_list) > 1:
        hi, lo = clients_list[-1], clients_list[0]
        for rows, name in ((stack_base, "stack base"), (stack_ft, "stack finetuned")):
            ratio = rows[-1]["tok_s"] / rows[0]["tok_s"]
            ratios[f"{name} {hi}/{lo}"] = ratio
            print(f"{name}: {hi} clients / {lo} client aggregate tok/s: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": bare + bare_adapter + stack_base + stack_ft, "ratios": ratios,
                                               "prompts": args.prompts, "lora_mode": mode, "checkpoint": str(ckpt)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
