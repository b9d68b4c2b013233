"""Serve the base model and the latest fine-tune behind an OpenAI-compatible API (Ray Serve).

    medtune serve                                        # serving/configs/smollm2.yaml, 127.0.0.1:8000
    medtune serve --config serving/configs/llama2_7b.yaml --storage /mnt/storage --host 0.0.0.0
    medtune serve --engine transformers --guardrails none --port 8001

Models: `base`, `finetuned` (the checkpoint storage LATEST names, hot-reloaded when training
publishes a new one) and `<run_id>/step_N`. Any OpenAI client works:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="finetuned", messages=[{"role": "user", "content": "..."}])

Set MEDTUNE_API_KEY (or MEDTUNE_API_KEY_FILE) to require `Authorization: Bearer <key>`.
Stops on Ctrl-C or SIGTERM, shutting the local Ray instance down with it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import time
import urllib.error
import urllib.request

from medtune.errors import MedtuneError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="serving YAML (default: serving/configs/smollm2.yaml)")
    parser.add_argument("--base-model", default=None, help="base model directory (overrides the config)")
    parser.add_argument("--storage", default=None, help="storage root with LATEST and runs/ (default $MEDTUNE_STORAGE or ./storage)")
    parser.add_argument("--engine", choices=("vllm", "transformers"), default=None, help="inference engine")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    parser.add_argument("--guardrails", default=None, help="default, none, or a policy YAML")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length: prompt plus completion tokens")
    parser.add_argument("--max-tokens-cap", type=int, default=None, help="largest max_tokens a request may ask for")
    parser.add_argument("--lora-mode", choices=("auto", "adapter", "merged"), default=None,
                        help="serve a LoRA fine-tune as an adapter or merged into a copy of the base (default auto: adapter on CUDA, merged elsewhere)")
    parser.add_argument("--no-finetuned", action="store_true", help="serve the base model only")
    parser.add_argument("--ray-address", default=None,
                        help="join this Ray cluster (e.g. auto) instead of starting a local one")
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for the engine to load")


def run_from_args(args: argparse.Namespace) -> int:
    from medtune.serving.config import load_config

    overrides = {"base_model": args.base_model, "storage": args.storage, "engine": args.engine, "host": args.host,
                 "port": args.port, "guardrails": args.guardrails,
                 "max_model_len": args.max_model_len, "max_tokens_cap": args.max_tokens_cap, "lora_mode": args.lora_mode}
    if args.no_finetuned:
        overrides["serve_finetuned"] = False
    cfg = load_config(args.config, overrides)
    _check_port_free(cfg.host, cfg.port)
    return serve_forever(cfg, ray_address=args.ray_address, ready_timeout=args.ready_timeout)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise MedtuneError(f"cannot listen on {host}:{port}: {err.strerror} (is another server running? use --port)") from None


def wait_ready(url: str, timeout: float) -> dict:
    """Poll GET /health until 200; raise MedtuneError if it reports a failure or time runs out."""
    import json

    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
            if body.get("status") == "failed":
                raise MedtuneError(f"the serving engine failed to start: {body.get('error')}") from None
            last = body.get("status", str(err.code))
        except (urllib.error.URLError, OSError, ValueError) as err:
            last = str(err)
        time.sleep(1)
    raise MedtuneError(f"{url} not ready after {timeout:.0f} s (last: {last}); see the log above")


def serve_forever(cfg, *, ray_address: str | None, ready_timeout: float) -> int:
    import ray
    from ray import serve

    from medtune.serving.app import app_from_config
    from medtune.training.train import ray_runtime_env

    def _stop(_signum, _frame):
        raise KeyboardInterrupt

    started = time.monotonic()
    ray.init(address=ray_address or "local", runtime_env=ray_runtime_env(), log_to_driver=True,
             include_dashboard=False if ray_address is None else None)
    # After ray.init, which installs a handler of its own that aborts the process.
    signal.signal(signal.SIGTERM, _stop)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(app_from_config(cfg), name="medtune", route_prefix="/", blocking=False)
        url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
        health = wait_ready(url, ready_timeout)
        print(f"medtune serve: ready in {time.monotonic() - started:.0f} s at {url}/v1 "
              f"(engine {cfg.engine}; base {cfg.base_model}; finetuned {health.get('finetuned') or 'none yet'})", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("medtune serve: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
