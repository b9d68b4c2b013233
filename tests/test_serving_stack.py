"""The whole serving stack: `medtune serve` (Ray Serve + vLLM CPU + LoRA) on a tiny model.

One server for the module, started the way an operator starts it (the console script, a
YAML config, the API key from the environment), stopped with SIGTERM at the end.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
import yaml
from openai import OpenAI

from conftest import publish_lora_checkpoint
from serving_util import free_port

pytestmark = pytest.mark.integration

KEY = "stack-test-key"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("stack")
    storage = root / "storage"
    publish_lora_checkpoint(storage, tiny_model_dir, run_id="run-s", step=1, seed=1)
    port = free_port()
    config = root / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": str(tiny_model_dir), "storage": str(storage), "engine": "vllm", "port": port,
        "max_model_len": 512, "max_tokens_cap": 256, "default_max_tokens": 16, "watch_interval_s": 0.5,
        "guardrails": "none", "kv_cache_gib": 1, "max_concurrent": 8, "max_queue": 8,
    }))
    from medtune.serving.launch import serve_process

    with serve_process(["--config", str(config)], log=root / "serve.log", timeout=240,
                       env={"MEDTUNE_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}) as server:
        yield {"url": server.url, "storage": storage, "proc": server.proc, "log": server.log, "model": tiny_model_dir}


@pytest.fixture()
def client(stack):
    return OpenAI(base_url=stack["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_api_key_required_except_health(stack):
    assert httpx.get(stack["url"] + "/health").status_code == 200
    assert httpx.get(stack["url"] + "/v1/models").status_code == 401
    bad = OpenAI(base_url=stack["url"] + "/v1", api_key="wrong", max_retries=0)
    import openai

    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_models_chat_and_completions_through_vllm(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "finetuned", "run-s/step_1"]
    msgs = [{"role": "user", "content": "What is a beta blocker?"}]
    full = client.chat.completions.create(model="finetuned", messages=msgs, max_tokens=12, temperature=0)
    assert full.usage.completion_tokens >= 1 and full.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="finetuned", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    base = client.chat.completions.create(model="base", messages=msgs, max_tokens=12, temperature=0, logprobs=True)
    tuned = client.chat.completions.create(model="finetuned", messages=msgs, max_tokens=12, temperature=0, logprobs=True)
    assert [t.logprob for t in base.choices[0].logprobs.content] != [t.logprob for t in tuned.choices[0].logprobs.content]
    done = client.completions.create(model="base", prompt="The heart", max_tokens=5, temperature=0)
    assert done.usage.completion_tokens == 5


def test_errors_keep_their_status_through_ray_serve(stack):
    headers = {"Authorization": f"Bearer {KEY}"}
    url = stack["url"] + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "x"}]
    assert httpx.post(url, json={"model": "nope", "messages": msgs}, headers=headers).status_code == 404
    assert httpx.post(url, json={"model": "base", "messages": msgs, "max_tokens": 999}, headers=headers).status_code == 413
    bad = httpx.post(url, content=b"{", headers={**headers, "content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


def test_new_checkpoint_switches_finetuned_while_a_stream_runs(stack, client):
    msgs = [{"role": "user", "content": "Tell me about the kidney."}]
    failures: list[BaseException] = []
    fingerprints: list[str] = []
    stop = threading.Event()

    def hammer():  # non-stream requests to `finetuned` all through the swap
        while not stop.is_set():
            try:
                r = client.chat.completions.create(model="finetuned", messages=msgs, max_tokens=4, temperature=0)
                fingerprints.append(r.system_fingerprint)
            except BaseException as err:  # noqa: BLE001
                failures.append(err)

    stream = client.chat.completions.create(model="finetuned", messages=msgs, max_tokens=200, temperature=0, stream=True)
    first = next(iter(stream))
    assert first.system_fingerprint == "medtune:run-s/step_1"
    worker = threading.Thread(target=hammer)
    worker.start()
    publish_lora_checkpoint(stack["storage"], stack["model"], run_id="run-s", step=2, seed=2)
    deadline = time.monotonic() + 60
    while "run-s/step_2" not in [m.id for m in client.models.list().data] and time.monotonic() < deadline:
        time.sleep(0.2)
    chunks = [c for c in stream]  # the old stream still ends normally
    time.sleep(1.0)
    stop.set()
    worker.join(60)
    assert not failures, failures
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert {c.system_fingerprint for c in chunks} == {"medtune:run-s/step_1"}
    assert [m.id for m in client.models.list().data] == ["base", "finetuned", "run-s/step_2"]
    assert fingerprints and fingerprints[-1] == "medtune:run-s/step_2"


def test_corrupt_checkpoint_is_refused_and_the_old_one_keeps_serving(stack, client):
    def truncate(staging):
        path = staging / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])

    publish_lora_checkpoint(stack["storage"], stack["model"], run_id="run-s", step=3, seed=3, before_publish=truncate)
    deadline = time.monotonic() + 30
    while "refusing checkpoint" not in stack["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "refusing checkpoint" in stack["log"].read_text()
    assert [m.id for m in client.models.list().data] == ["base", "finetuned", "run-s/step_2"]
    r = client.chat.completions.create(model="finetuned", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.system_fingerprint == "medtune:run-s/step_2"


def test_sigterm_stops_the_server_cleanly(stack):
    proc = stack["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0
    assert "medtune serve: stopping" in stack["log"].read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(stack["url"] + "/health", timeout=5)
