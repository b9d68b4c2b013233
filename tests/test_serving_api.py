"""The OpenAI-compatible HTTP layer over a real engine (transformers, tiny Llama), in-process.

The official `openai` client talks to the app on a loopback port; the Ray Serve + vLLM stack
is tested end to end in test_serving_stack.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import publish_lora_checkpoint
from serving_util import running_app

from medtune.guardrails.base import Verdict

DIFFERENT_TEMPLATE = (
    "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>[assistant] ' }}{% endif %}"
)


class StopAfter:
    def __init__(self, limit: int | None) -> None:
        self.limit, self.seen = limit, 0

    def push(self, delta: str):
        if self.limit is not None and self.seen + len(delta) >= self.limit:
            keep = delta[: max(0, self.limit - self.seen)]
            self.seen = self.limit
            return keep, Verdict("block", " [stopped by policy]", "test", "output limit")
        self.seen += len(delta)
        return delta, None

    def finish(self):
        return "", None


class TrivialGuard:
    """The hook contract with a policy a test can predict."""

    def __init__(self) -> None:
        self.output_limit: int | None = None
        self.inputs: list[str] = []

    def check_input(self, text, *, request_id=None):
        self.inputs.append(text)
        if "FORBIDDEN" in text:
            return Verdict("block", "I can't help with that, but I can help with something else.", "test", "trigger word")
        if "555-0100" in text:
            return Verdict("redact", text.replace("555-0100", "[PHONE]"), "pii", "phone number")
        return Verdict("allow", text)

    def output_filter(self, *, request_id=None):
        return StopAfter(self.output_limit)


@pytest.fixture(scope="module")
def storage(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("storage")
    publish_lora_checkpoint(root, tiny_model_dir, run_id="run-a", step=1, seed=1, chat_template=DIFFERENT_TEMPLATE)
    return root


@pytest.fixture(scope="module")
def guard():
    return TrivialGuard()


@pytest.fixture(scope="module")
def server(tiny_model_dir, storage, guard):
    from medtune.serving.config import ServeConfig

    cfg = ServeConfig(base_model=str(tiny_model_dir), storage=str(storage), engine="transformers", dtype="float32",
                      max_model_len=256, max_tokens_cap=64, default_max_tokens=8, max_concurrent=1, max_queue=1,
                      watch_interval_s=0.2, guardrails="none", max_request_bytes=20_000)
    with running_app(cfg, guard=guard) as (url, service, app, loop):
        yield url, service, app


@pytest.fixture()
def client(server):
    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, model="base", content="What is aspirin?", **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def test_models_list_base_finetuned_and_checkpoint(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "finetuned", "run-a/step_1"}
    ft = models["finetuned"].model_extra["medtune"]
    assert ft["checkpoint"] == "run-a/step_1" and ft["step"] == 1 and ft["kind"] == "finetuned"
    assert models["finetuned"].created == models["run-a/step_1"].created
    assert client.models.retrieve("run-a/step_1").id == "run-a/step_1"


def test_chat_non_stream_and_stream_agree(client):
    full = ask(client, "finetuned", max_tokens=6)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens > 5
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.system_fingerprint == "medtune:run-a/step_1"
    chunks = list(ask(client, "finetuned", max_tokens=6, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: same answer either way
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_finetuned_uses_its_adapter_and_its_own_template(client):
    base = ask(client, "base", max_tokens=8, logprobs=True)
    tuned = ask(client, "finetuned", max_tokens=8, logprobs=True)
    assert base.usage.prompt_tokens != tuned.usage.prompt_tokens  # the checkpoint's template renders differently
    base_lp = [t.logprob for t in base.choices[0].logprobs.content]
    tuned_lp = [t.logprob for t in tuned.choices[0].logprobs.content]
    assert base_lp != tuned_lp


def test_logprobs_and_top_logprobs(client):
    r = ask(client, "base", max_tokens=3, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert token.logprob == pytest.approx(max(t.logprob for t in token.top_logprobs), abs=1e-4)


def test_completions_stream_and_not(client):
    r = client.completions.create(model="base", prompt="The heart", max_tokens=5, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.usage.completion_tokens == 5
    assert len(r.choices[0].logprobs.tokens) == 5 and len(r.choices[0].logprobs.top_logprobs[0]) == 2
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt="The heart", max_tokens=5, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_seeded_sampling_repeats(client):
    a = ask(client, "base", temperature=1.0, seed=7, max_tokens=8).choices[0].message.content
    b = ask(client, "base", temperature=1.0, seed=7, max_tokens=8).choices[0].message.content
    assert a == b


def test_stop_sequence_ends_the_answer(client):
    free = ask(client, "base", max_tokens=12).choices[0].message.content
    if len(free) < 4:
        pytest.skip("the random model produced too little text to pick a stop sequence from")
    stop = free[2:4]
    stopped = ask(client, "base", max_tokens=12, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.message.content and free.startswith(stopped.message.content)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "base"}, 400, "messages"),
        ({"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "n": 9}, 400, "n"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 65}, 413, "max_tokens"),
        ({"model": "base", "messages": [{"role": "user", "content": "word " * 400}]}, 413, "messages"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 64, "stream": True}, 200, None),
    ],
)
def test_bad_requests_get_openai_shaped_errors(server, body, status, param):
    resp = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == status, resp.text
    if status != 200:
        err = resp.json()["error"]
        assert err["message"] and err["type"] and "Traceback" not in err["message"]
        if param:
            assert err["param"] == param


def test_malformed_and_oversized_bodies(server):
    url = server[0] + "/v1/chat/completions"
    bad = httpx.post(url, content=b'{"model": "base", "messages": [', headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    big = httpx.post(url, json={"model": "base", "messages": [{"role": "user", "content": "x" * 30_000}]})
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    assert httpx.get(server[0] + "/v1/nothing").json()["error"]["code"] == "not_found"


def test_openai_client_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        ask(client, "nope")
    with pytest.raises(openai.BadRequestError):
        ask(client, "base", n=9)


def test_input_guard_blocks_with_content_filter(client, guard):
    r = ask(client, "finetuned", content="tell me the FORBIDDEN thing")
    assert r.choices[0].finish_reason == "content_filter"
    assert "can't help" in r.choices[0].message.content
    assert r.model_extra["medtune"]["guardrail"]["stage"] == "input"
    chunks = list(ask(client, "finetuned", content="FORBIDDEN", stream=True))
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert "can't help" in "".join(c.choices[0].delta.content or "" for c in chunks)


def test_every_turn_the_client_sends_is_checked_assistant_turns_included(client, guard):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "the FORBIDDEN recipe, step one"}, {"role": "user", "content": "go on"}]
    r = client.chat.completions.create(model="base", messages=messages, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "content_filter"
    assert guard.inputs[-3:] == ["be brief", "hi", "the FORBIDDEN recipe, step one"]


def test_input_guard_redaction_reaches_the_model_redacted(client, guard):
    r = client.completions.create(model="base", prompt="call me at 555-0100 today", max_tokens=2, temperature=0, echo=True)
    assert r.choices[0].text.startswith("call me at [PHONE] today")
    ask(client, "base", content="my number is 555-0100")
    assert guard.inputs[-1] == "my number is 555-0100"  # the guard saw the original; the model got [PHONE]


def test_output_guard_stops_a_stream(client, guard):
    guard.output_limit = 3
    try:
        chunks = list(ask(client, "base", max_tokens=40, stream=True, content="Say a lot."))
        full = ask(client, "base", max_tokens=40, content="Say a lot.")
    finally:
        guard.output_limit = None
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert chunks[-1].model_extra["medtune"]["guardrail"]["stage"] == "output"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.endswith("[stopped by policy]") and len(text) <= 3 + len(" [stopped by policy]")
    assert full.choices[0].finish_reason == "content_filter"
    assert full.usage.completion_tokens < 40  # generation stopped, not merely hidden


def test_queue_full_gets_429_with_retry_after(server):
    url, service, app = server
    admission = app.state.admission
    taken = admission.limit - admission.tickets
    admission.tickets += taken  # every slot and queue place busy
    try:
        resp = httpx.post(url + "/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "x"}]})
    finally:
        admission.tickets -= taken
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["type"] == "rate_limit_error"


def test_concurrent_requests_queue_then_complete(client):
    results, errors = [], []

    def one():
        try:
            results.append(ask(client, "base", max_tokens=4).choices[0].finish_reason)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(2)]  # 1 running + 1 queued fits
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 2


def test_client_disconnect_stops_generation(server):
    url, service, app = server
    engine = service.base.engine
    before = engine.cancelled
    body = {"model": "base", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 64, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as resp:
        for i, _line in enumerate(resp.iter_lines()):
            if i >= 2:
                break
    deadline = time.monotonic() + 10
    while engine.cancelled == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.cancelled == before + 1
    health = httpx.get(url + "/health").json()
    assert health["requests"]["running"] == 0


def test_hot_swap_to_a_new_checkpoint_and_refusing_a_corrupt_one(server, client, storage, tiny_model_dir, caplog):
    url, service, app = server
    publish_lora_checkpoint(storage, tiny_model_dir, run_id="run-a", step=2, seed=2)
    deadline = time.monotonic() + 30
    while "run-a/step_2" not in {m.id for m in client.models.list().data} and time.monotonic() < deadline:
        time.sleep(0.1)
    ids = {m.id for m in client.models.list().data}
    assert ids == {"base", "finetuned", "run-a/step_2"}
    assert ask(client, "finetuned").system_fingerprint == "medtune:run-a/step_2"

    # a checkpoint whose adapter does not match its manifest: refused, step 2 keeps serving
    from medtune.training import checkpoints as ck

    def corrupt(staging):
        with open(staging / "adapter_model.safetensors", "r+b") as fh:
            fh.seek(100)
            fh.write(b"\x00\x01\x02\x03")

    with caplog.at_level("WARNING", logger="medtune.serving.service"):
        bad = publish_lora_checkpoint(storage, tiny_model_dir, run_id="run-a", step=3, seed=3, before_publish=corrupt)
        assert _run(service, service.poll_once()) is False
    assert any("refusing checkpoint" in r.message and "sha256" in r.message for r in caplog.records)
    assert ck.latest_checkpoint(storage) == bad
    assert ask(client, "finetuned").system_fingerprint == "medtune:run-a/step_2"
    assert httpx.get(url + "/health").json()["finetuned"] == "run-a/step_2"


def _run(service, coro):
    import asyncio

    loop = service._watcher.get_loop()
    return asyncio.run_coroutine_threadsafe(coro, loop).result(60)


def test_api_key_is_enforced(tiny_model_dir, tmp_path):
    from medtune.serving.config import ServeConfig

    cfg = ServeConfig(base_model=str(tiny_model_dir), storage=str(tmp_path), engine="transformers", dtype="float32",
                      max_model_len=256, max_tokens_cap=32, default_max_tokens=4, guardrails="none")
    with running_app(cfg, api_key="s3cret-key") as (url, service, app, loop):
        assert httpx.get(url + "/health").status_code == 200  # health needs no key
        resp = httpx.get(url + "/v1/models")
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        good = OpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["base"]  # no checkpoint in this storage
        assert ask(good, "base", max_tokens=2).usage.completion_tokens == 2
        assert "s3cret-key" not in json.dumps(httpx.get(url + "/health").json())


# ---- scoring extensions: /tokenize, logprob_token_ids, prompt_logprobs, echo + logprobs ---------------

def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def _full_logprobs(service, model_id: str, ids: list[int]):
    """Reference: one plain forward pass of the served weights over `ids` (no cache, no engine)."""
    import torch

    model = service.resolve(model_id)
    net = model.engine.model
    with torch.inference_mode():
        if hasattr(net, "disable_adapter") and model.adapter is None:
            with net.disable_adapter():
                logits = net(input_ids=torch.tensor([ids])).logits[0].float()
        else:
            logits = net(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_tokenize_matches_the_served_tokenizer(server):
    url, service, _ = server
    body = _post(url, "/tokenize", {"model": "finetuned", "prompt": "Yes", "add_special_tokens": False, "return_token_strs": True}).json()
    tok = service.resolve("finetuned").tokenizer
    assert body["tokens"] == tok("Yes", add_special_tokens=False)["input_ids"] and body["count"] == len(body["tokens"])
    assert "".join(body["token_strs"]) == "Yes"
    msgs = [{"role": "user", "content": "hi"}]
    rendered = _post(url, "/tokenize", {"model": "base", "messages": msgs}).json()["tokens"]
    base_tok = service.resolve("base").tokenizer
    assert rendered == base_tok(base_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)["input_ids"]
    assert _post(url, "/tokenize", {"model": "base"}).status_code == 400
    assert _post(url, "/tokenize", {"model": "nope", "prompt": "x"}).status_code == 404


def test_logprob_token_ids_give_those_tokens_over_the_whole_vocabulary(server, client):
    url, service, _ = server
    msgs = [{"role": "user", "content": "Is aspirin useful?"}]
    asked = [5, 17, 3]
    r = client.chat.completions.create(model="base", messages=msgs, max_tokens=1, temperature=0, logprobs=True,
                                       extra_body={"logprob_token_ids": asked})
    top = r.choices[0].logprobs.content[0].top_logprobs
    tok = service.resolve("base").tokenizer
    prompt_ids = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    reference = _full_logprobs(service, "base", prompt_ids)[-1]
    assert [t.token for t in top] == [tok.decode([i]) for i in asked]
    assert [t.logprob for t in top] == pytest.approx([float(reference[i]) for i in asked], abs=1e-4)
    bad = _post(url, "/v1/chat/completions", {"model": "base", "messages": msgs, "logprob_token_ids": [1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logprob_token_ids"  # needs logprobs
    bad = _post(url, "/v1/chat/completions", {"model": "base", "messages": msgs, "logprobs": True, "logprob_token_ids": [10**9]})
    assert bad.status_code == 400


def test_continue_final_message_and_prompt_logprobs(server, client):
    url, service, _ = server
    msgs = [{"role": "user", "content": "Is aspirin useful?"}, {"role": "assistant", "content": "Yes, it"}]
    r = client.chat.completions.create(model="finetuned", messages=msgs, max_tokens=1, temperature=0, logprobs=True,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False,
                                                   "prompt_logprobs": 2})
    model = service.resolve("finetuned")
    tok = model.tokenizer
    head = tok(tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    ids = head + tok("Yes, it", add_special_tokens=False)["input_ids"]
    prompt_lps = r.model_extra["prompt_logprobs"]
    assert len(prompt_lps) == len(ids) == r.usage.prompt_tokens and prompt_lps[0] is None
    reference = _full_logprobs(service, "finetuned", ids)
    for pos in range(1, len(ids)):
        entry = prompt_lps[pos]
        assert entry[str(ids[pos])]["logprob"] == pytest.approx(float(reference[pos - 1, ids[pos]]), abs=1e-4)
        assert len(entry) <= 3  # the prompt's token and the top 2
    bad = _post(url, "/v1/chat/completions", {"model": "base", "messages": msgs, "continue_final_message": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "add_generation_prompt"
    bad = _post(url, "/v1/chat/completions", {"model": "base", "messages": msgs[:1], "continue_final_message": True,
                                              "add_generation_prompt": False})
    assert bad.status_code == 400


def test_completions_echo_with_logprobs_scores_the_prompt(server, client):
    url, service, _ = server
    r = client.completions.create(model="base", prompt="The heart pumps blood", max_tokens=2, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    tok = service.resolve("base").tokenizer
    ids = tok("The heart pumps blood")["input_ids"]
    n = len(ids)
    assert len(lp.tokens) == n + r.usage.completion_tokens and lp.token_logprobs[0] is None
    assert r.choices[0].text.startswith("The heart pumps blood")
    reference = _full_logprobs(service, "base", ids)
    assert lp.token_logprobs[1:n] == pytest.approx([float(reference[i - 1, ids[i]]) for i in range(1, n)], abs=1e-4)
    assert "".join(lp.tokens[:n]) == tok.decode(ids)
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    stream = _post(url, "/v1/completions", {"model": "base", "prompt": "x", "echo": True, "logprobs": 0, "stream": True})
    assert stream.status_code == 400


def test_metrics_scrape_and_counters_move(server, client, guard):
    from prometheus_client.parser import text_string_to_metric_families

    url = server[0]

    def scrape() -> dict:
        resp = httpx.get(url + "/metrics")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
        samples = {}
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def value(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    before = scrape()
    ask(client, "finetuned", max_tokens=4)
    list(ask(client, "base", max_tokens=3, stream=True))
    ask(client, "base", content="FORBIDDEN topic")
    with pytest.raises(Exception):
        ask(client, "nope")
    after = scrape()
    route = "/v1/chat/completions"
    assert value(after, "medtune_requests_total", route=route, model="finetuned", status="200") == \
        value(before, "medtune_requests_total", route=route, model="finetuned", status="200") + 1
    assert value(after, "medtune_requests_total", route=route, model="base", status="200") >= \
        value(before, "medtune_requests_total", route=route, model="base", status="200") + 2
    assert value(after, "medtune_requests_total", route=route, model="unknown", status="404") >= 1
    assert value(after, "medtune_request_seconds_count", route=route, model="base") >= \
        value(before, "medtune_request_seconds_count", route=route, model="base") + 2  # the stream counted at its end
    assert value(after, "medtune_ttft_seconds_count", model="finetuned") == value(before, "medtune_ttft_seconds_count", model="finetuned") + 1
    assert value(after, "medtune_tokens_total", model="finetuned", kind="completion") >= \
        value(before, "medtune_tokens_total", model="finetuned", kind="completion") + 1
    assert value(after, "medtune_guardrail_verdicts_total", stage="input", action="block", category="test", layer="") >= 1
    assert value(after, "medtune_finetuned_info", checkpoint=server[1].finetuned.checkpoint, serving=server[1].finetuned.mode) == 1
    assert value(after, "medtune_reloads_total", result="loaded") >= 1
    assert ("medtune_queue_depth", ()) in after and ("medtune_requests_in_progress", ()) in after


def test_structured_choice_constrains_the_answer_and_the_guard_still_runs(server, client, guard):
    url = server[0]
    for model in ("base", "finetuned"):
        r = ask(client, model, max_tokens=8, extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
        assert r.choices[0].message.content in ("yes", "no", "maybe") and r.choices[0].finish_reason == "stop"
    seeded = [ask(client, "base", max_tokens=8, temperature=1.0, seed=s, extra_body={"structured_outputs": {"choice": ["Yes, it does", "No"]}})
              .choices[0].message.content for s in (1, 2, 3, 1)]
    assert set(seeded) <= {"Yes, it does", "No"} and seeded[0] == seeded[3]
    guard.output_limit = 1  # output rails on a constrained answer: still cut
    try:
        r = ask(client, "base", max_tokens=8, extra_body={"structured_outputs": {"choice": ["maybe"]}})
        assert r.choices[0].finish_reason == "content_filter"
    finally:
        guard.output_limit = None
    # what the transformers engine cannot do is refused, OpenAI-shaped
    msgs = [{"role": "user", "content": "x"}]
    bad = _post(url, "/v1/chat/completions", {"model": "base", "messages": msgs,
                                              "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": {"type": "object"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unsupported"
    for structured in ({"choice": []}, {"choice": ["a"], "regex": "a"}, {"grammar": "x"}):
        bad = _post(url, "/v1/chat/completions", {"model": "base", "messages": msgs, "structured_outputs": structured})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "structured_outputs", structured


def test_n_choices_with_seed_repeat_and_stream_like_the_whole(client, guard):
    kw = dict(max_tokens=6, temperature=1.0, seed=11, n=3)
    first = ask(client, "finetuned", **kw)
    again = ask(client, "finetuned", **kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # seed + i per choice: the whole response repeats
    assert len(set(texts)) > 1  # and the choices are different samples
    assert first.usage.completion_tokens >= 3  # one usage for the request: every choice's tokens
    chunks = list(ask(client, "finetuned", stream=True, stream_options={"include_usage": True}, **kw))
    streamed = {}
    for c in chunks:
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert len(finishes) == 3
    single = ask(client, "finetuned", max_tokens=6, temperature=1.0, seed=11)
    assert single.choices[0].message.content == texts[0]  # choice 0 is the request with n=1
    completions = client.completions.create(model="base", prompt="The heart", max_tokens=4, temperature=1.0, seed=5, n=2)
    assert [c.index for c in completions.choices] == [0, 1]


def test_n_choices_each_pass_the_guards(client, guard):
    blocked = ask(client, "base", content="FORBIDDEN", n=2)
    assert [c.finish_reason for c in blocked.choices] == ["content_filter", "content_filter"]
    guard.output_limit = 2
    try:
        cut = ask(client, "base", max_tokens=12, temperature=1.0, seed=3, n=2)
        assert [c.finish_reason for c in cut.choices] == ["content_filter", "content_filter"]
    finally:
        guard.output_limit = None
