"""The whole serving stack: `medtune serve` (Ray Serve + vLLM CPU + LoRA) on a tiny model.

One server per LoRA serving mode (merged: the CPU default; adapter: the GPU default), started
the way an operator starts it (the console script, a YAML config, the API key from the
environment), stopped with SIGTERM at the end of each.
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


@pytest.fixture(scope="module", params=["merged", "adapter"])
def stack(request, tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp(f"stack-{request.param}")
    storage = root / "storage"
    publish_lora_checkpoint(storage, tiny_model_dir, run_id="run-s", step=1, seed=1)
    port = free_port()
    config = root / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": str(tiny_model_dir), "storage": str(storage), "engine": "vllm", "port": port,
        "max_model_len": 512, "max_tokens_cap": 256, "default_max_tokens": 16, "watch_interval_s": 0.5,
        "guardrails": "none", "kv_cache_gib": 1, "max_concurrent": 8, "max_queue": 8,
        "lora_mode": request.param, "merge_dir": str(root),
    }))
    from medtune.serving.launch import serve_process

    with serve_process(["--config", str(config)], log=root / "serve.log", timeout=240,
                       env={"MEDTUNE_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}) as server:
        yield {"url": server.url, "storage": storage, "proc": server.proc, "log": server.log, "model": tiny_model_dir,
               "mode": request.param, "root": root}


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


def test_scoring_extensions_through_vllm(stack, client):
    """/tokenize, logprob_token_ids, continue_final_message + prompt_logprobs and echo + logprobs on the real
    engine: a decision word's logprob as the next token equals its prompt logprob once it is appended."""
    headers = {"Authorization": f"Bearer {KEY}"}
    yes = httpx.post(stack["url"] + "/tokenize", headers=headers, timeout=60,
                     json={"model": "finetuned", "prompt": "Yes", "add_special_tokens": False, "return_token_strs": True}).json()
    first = yes["tokens"][0]
    msgs = [{"role": "user", "content": "Is aspirin useful?"}]
    r = client.chat.completions.create(model="finetuned", messages=msgs, max_tokens=1, temperature=0, logprobs=True,
                                       extra_body={"logprob_token_ids": [first]})
    top = r.choices[0].logprobs.content[0].top_logprobs
    assert [t.token for t in top] == [yes["token_strs"][0]]
    cont = client.chat.completions.create(model="finetuned", max_tokens=1, temperature=0,
                                          messages=[*msgs, {"role": "assistant", "content": yes["token_strs"][0]}],
                                          extra_body={"continue_final_message": True, "add_generation_prompt": False,
                                                      "prompt_logprobs": 0})
    prompt_lps = cont.model_extra["prompt_logprobs"]
    assert prompt_lps[0] is None and len(prompt_lps) == cont.usage.prompt_tokens
    assert prompt_lps[-1][str(first)]["logprob"] == pytest.approx(top[0].logprob, abs=0.05)
    echo = client.completions.create(model="base", prompt="The heart pumps blood", max_tokens=1, temperature=0, echo=True, logprobs=0)
    lp = echo.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == echo.usage.prompt_tokens + echo.usage.completion_tokens


def test_structured_outputs_through_vllm(stack, client):
    msgs = [{"role": "user", "content": "Is aspirin useful? Answer yes, no or maybe."}]
    r = client.chat.completions.create(model="finetuned", messages=msgs, max_tokens=8, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert r.choices[0].message.content in ("yes", "no", "maybe")
    schema = {"type": "object", "properties": {"decision": {"type": "string", "enum": ["yes", "no", "maybe"]}},
              "required": ["decision"], "additionalProperties": False}
    import json

    r = client.chat.completions.create(model="base", messages=msgs, max_tokens=40, temperature=0,
                                       extra_body={"structured_outputs": {"regex": r'\{"decision": "(yes|no|maybe)"\}'}})
    assert json.loads(r.choices[0].message.content)["decision"] in ("yes", "no", "maybe")
    # a schema: the tiny random model pads with the whitespace JSON allows, so only the start is sure within 40 tokens
    r = client.chat.completions.create(model="base", messages=msgs, max_tokens=40, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {"name": "decision", "schema": schema}})
    text = r.choices[0].message.content
    assert text.startswith('{"decision"') or text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert json.loads(text)["decision"] in ("yes", "no", "maybe")
    r = client.completions.create(model="base", prompt="A JSON object about the heart: ", max_tokens=40, temperature=0,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{3}"}})
    assert len(r.choices[0].text) == 3 and r.choices[0].text.isdigit()


def test_n_choices_with_seed_through_vllm(client):
    msgs = [{"role": "user", "content": "Name a heart medicine."}]
    kw = dict(model="finetuned", messages=msgs, max_tokens=8, temperature=1.0, seed=7, n=3)
    first, again = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


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
    deadline = time.monotonic() + 30
    while not (fingerprints and fingerprints[-1] == "medtune:run-s/step_2") and time.monotonic() < deadline and not failures:
        time.sleep(0.2)
    stop.set()
    worker.join(60)
    assert not failures, failures
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert {c.system_fingerprint for c in chunks} == {"medtune:run-s/step_1"}
    assert [m.id for m in client.models.list().data] == ["base", "finetuned", "run-s/step_2"]
    assert fingerprints and fingerprints[-1] == "medtune:run-s/step_2"
    assert client.models.retrieve("finetuned").medtune["serving"] == stack["mode"]
    if stack["mode"] == "merged":  # the retired copy is removed once its last request is done
        deadline = time.monotonic() + 30
        while len(list(stack["root"].glob("medtune-merged-*"))) > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(list(stack["root"].glob("medtune-merged-*"))) == 1


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
    assert not list(stack["root"].glob("medtune-merged-*"))  # merged copies go with the server
    with pytest.raises(httpx.ConnectError):
        httpx.get(stack["url"] + "/health", timeout=5)
