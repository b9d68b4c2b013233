"""Serving load benchmark: the full medtune stack against the bare vLLM engine, same script.

    python bench/serve_load.py                       # SmolLM2-135M from `make model`, 1 and 8 clients
    python bench/serve_load.py --clients 1,4,8 --requests 4 --max-tokens 128 --guardrails default

Baseline: vLLM's AsyncLLM driven directly in this process (same engine arguments as the
service, LoRA enabled), N concurrent streams of the same chat prompts, greedy. Then the full
stack: `medtune serve` (Ray Serve, the FastAPI layer, guardrails, LoRA-enabled engine) as a
subprocess on 127.0.0.1, N concurrent streaming clients through the official `openai` client.
Both phases generate the same tokens (greedy, same prompts), so tokens/s compare directly.
Prints aggregate completion tokens/s, TTFT p50/p95 and the ratios:

    stack / bare at each concurrency          target >= 0.85
    8 clients / 1 client (stack)              target >= 4x

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
QUESTIONS = [
    "Does regular aspirin use lower the risk of a second heart attack?",
    "Is metformin safe to continue before a CT scan with contrast?",
    "Can vitamin D supplements prevent fractures in older adults?",
    "Does early mobilisation shorten hospital stay after hip surgery?",
    "Is there an association between sleep apnoea and atrial fibrillation?",
    "Do statins reduce mortality in patients over eighty?",
    "Can probiotics prevent antibiotic-associated diarrhoea in children?",
    "Does smoking cessation improve outcomes after lung cancer surgery?",
]


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


def messages(i: int) -> list[dict]:
    from medtune.training.prompts import SYSTEM_PROMPT

    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


# ---- baseline: the bare engine ------------------------------------------------------------------
async def bare_phase(cfg, clients_list: list[int], requests: int, max_tokens: int) -> list[dict]:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from medtune.serving.vllm_engine import VLLMEngine

    wrapper = VLLMEngine(cfg.base_model, cfg, enable_lora=True)  # only to build AsyncLLM with the same args
    await wrapper.start()
    engine = wrapper.engine
    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    prompts = [tok(tok.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
               for i in range(len(QUESTIONS))]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)
    counter = iter(range(10**9))

    async def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        ttft, n = None, 0
        async for out in engine.generate({"prompt_token_ids": prompts[i % len(prompts)]}, params, f"bare-{next(counter)}"):
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
        results.append(summarise("bare vLLM", clients, time.perf_counter() - start, [r for rs in per_client for r in rs]))
        print(f"  bare  clients={clients}: {results[-1]['tok_s']:.1f} tok/s", flush=True)
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
        results.append(summarise("medtune stack", clients, time.perf_counter() - start, [r for rs in per_client for r in rs]))
        print(f"  stack clients={clients}: {results[-1]['tok_s']:.1f} tok/s", flush=True)
    await client.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "storage/models/smollm2-135m-instruct"))
    parser.add_argument("--storage", default=str(REPO / "storage"), help="checkpoints for `finetuned` (the stack loads LATEST)")
    parser.add_argument("--config", default="serving/configs/smollm2.yaml")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--requests", type=int, default=3, help="sequential requests per client")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--guardrails", default="default")
    parser.add_argument("--model-id", default="base", help="model id the stack clients ask for (base or finetuned)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"{args.model}: no model (run `make model`)")
    clients_list = [int(c) for c in args.clients.split(",")]

    from medtune.serving.config import load_config

    cfg = load_config(args.config, {"base_model": args.model, "storage": args.storage})
    # Ray gives the serving replica OMP_NUM_THREADS = its CPU reservation; the bare engine gets
    # the same, so the two phases differ only by the stack in front of the engine.
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(cfg.cpus_per_replica)))
    print(f"bare vLLM engine ({args.model}), clients {clients_list}, {args.requests} requests each, max_tokens {args.max_tokens}", flush=True)
    bare = asyncio.run(bare_phase(cfg, clients_list, args.requests, args.max_tokens))
    from medtune.serving.launch import serve_process

    with tempfile.TemporaryDirectory() as tmp:
        print(f"medtune stack (Ray Serve + FastAPI + guardrails={args.guardrails}) on 127.0.0.1", flush=True)
        serve_args = ["--config", args.config, "--base-model", args.model, "--storage", args.storage, "--guardrails", args.guardrails]
        with serve_process(serve_args, log=Path(tmp) / "serve.log") as server:
            stack = asyncio.run(stack_phase(server.url, clients_list, args.requests, args.max_tokens, args.model_id))

    print(f"\n{'phase':<15}{'clients':>8}{'requests':>9}{'tokens':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p95':>10}")
    for row in bare + stack:
        print(f"{row['phase']:<15}{row['clients']:>8}{row['requests']:>9}{row['tokens']:>8}{row['tok_s']:>9.1f}"
              f"{row['ttft_p50_ms']:>8.0f}ms{row['ttft_p95_ms']:>8.0f}ms")
    print()
    ratios = {}
    for b, s in zip(bare, stack):
        ratios[f"stack/bare@{b['clients']}"] = s["tok_s"] / b["tok_s"]
        print(f"stack / bare throughput at {b['clients']} clients: {s['tok_s'] / b['tok_s']:.2f}  (target >= 0.85)")
    if len(clients_list) > 1:
        hi, lo = clients_list[-1], clients_list[0]
        for rows, name in ((bare, "bare"), (stack, "stack")):
            ratio = rows[-1]["tok_s"] / rows[0]["tok_s"]
            ratios[f"{name} {hi}/{lo}"] = ratio
            print(f"{name}: {hi} clients / {lo} client aggregate tok/s: {ratio:.2f}x" + ("  (target >= 4x)" if name == "stack" else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": bare + stack, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
