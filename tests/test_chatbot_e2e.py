"""End to end in a real browser: headless Chromium (Debian's package, driven by Playwright)
against `medtune chat` against a live `medtune serve` (transformers engine, a tiny random Llama
as the base, a tiny LoRA checkpoint published through the storage contract as the fine-tune).

Type a question, press Enter, both panes fill (with their metrics), the pane titles name the
models and the checkpoint step, a vote lands in the JSONL, and a screenshot is saved under
artifacts/tests/ (gitignored; the path is printed). Skips cleanly without /usr/bin/chromium or
the playwright package (`.ci/run` installs Chromium when apt-get is available).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, publish_lora_checkpoint

CHROMIUM = Path(os.environ.get("MEDTUNE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "artifacts" / "tests"
RUN_ID = "e2e-run"
STEP = 3
SERVE_READY_S = 180  # Ray start + engine load; about a minute on this 2-core machine
MEDTUNE = [sys.executable, "-m", "medtune"]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} not installed (apt-get install -y chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:4]} exited with {proc.returncode} before {url} answered:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"{url} not ready after {timeout:.0f} s:\n{tail(log)}")


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM (serve shuts its local Ray down on it), then SIGKILL the process group we made."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def live_serve(tmp_path_factory, tiny_model_dir):
    from medtune.serving.launch import serve_process

    tmp = tmp_path_factory.mktemp("chat-e2e")
    storage = tmp / "storage"
    publish_lora_checkpoint(storage, tiny_model_dir, run_id=RUN_ID, step=STEP)
    # The shipped config's context (2048) is longer than the tiny model's (1024 positions).
    config = tmp / "serve.yaml"
    config.write_text("max_model_len: 1024\nmax_tokens_cap: 256\ndefault_max_tokens: 64\n"
                      f"base_model: {tiny_model_dir}\nengine: transformers\n", encoding="utf-8")
    args = ["--config", str(config), "--storage", str(storage), "--guardrails", "none"]
    with serve_process(args, log=tmp / "serve.log", timeout=SERVE_READY_S,
                       env={"MEDTUNE_STORAGE": str(storage), "RAY_DEDUP_LOGS": "0", "MEDTUNE_API_KEY": None}) as server:
        yield server.url + "/v1"


@pytest.fixture(scope="module")
def chat_app(live_serve, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat-app")
    votes = tmp / "votes.jsonl"
    port = free_port()
    log = tmp / "chat.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    env.pop("MEDTUNE_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*MEDTUNE, "chat", "--api-base", live_serve, "--port", str(port), "--votes", str(votes),
             "--max-tokens", "24"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/", 60, proc, log)
        yield f"http://127.0.0.1:{port}/", votes, log
    finally:
        stop(proc, grace=10)


def test_browser_asks_both_models_and_records_a_vote(chat_app):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    url, votes, log = chat_app
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "chatbot_e2e.png"
    finished = re.compile(r"tokens in \d")  # the metrics line closes a finished answer
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="load")
            page.locator("#message textarea").wait_for(state="visible", timeout=60_000)
            right_title = page.locator("#title-right")
            sync_api.expect(right_title).to_contain_text(f"{RUN_ID}/step_{STEP}", timeout=30_000)
            sync_api.expect(right_title).to_contain_text(f"step {STEP}")
            sync_api.expect(page.locator("#title-left")).to_contain_text("base")

            page.locator("#message textarea").fill("Does aspirin reduce the risk of stroke?")
            page.locator("#message textarea").press("Enter")
            for pane in ("#pane-left", "#pane-right"):
                sync_api.expect(page.locator(pane)).to_contain_text("Does aspirin reduce the risk of stroke?",
                                                                    timeout=30_000)
                sync_api.expect(page.locator(pane)).to_contain_text(finished, timeout=120_000)
                sync_api.expect(page.locator(pane)).to_contain_text("TTFT")
            page.locator("#vote-right").wait_for(state="visible", timeout=30_000)
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot: {shot}")
            page.locator("#vote-right").click()
            sync_api.expect(page.locator("#notice")).to_contain_text("Vote recorded", timeout=30_000)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "chatbot_e2e_failure.png"), full_page=True)
            print(f"\nchat app log:\n{tail(log)}")
            raise
        finally:
            browser.close()
    rows = [json.loads(line) for line in votes.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["vote"] == "right" and row["question"] == "Does aspirin reduce the risk of stroke?"
    assert row["models"] == {"left": "base", "right": f"{RUN_ID}/step_{STEP}"}
    assert row["checkpoint"] == f"{RUN_ID}/step_{STEP}" and row["winner"] == row["models"]["right"]
    assert set(row["answers"]) == {"left", "right"} and row["status"] == {"left": "done", "right": "done"}
    for side in ("left", "right"):
        assert row["latency"][side]["tokens_source"] == "usage" and row["latency"][side]["total_s"] > 0
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_browser_stop_single_model_mode_and_endpoint_down(tmp_path):
    """The controls in a real browser, against the fake endpoint of test_chatbot.py (fast, no
    model): single-model mode hides a pane and asks one model, Stop ends an endless answer and
    keeps it, and a dead endpoint shows a message in the panes while the app keeps working."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    from test_chatbot import FakeOpenAI

    from medtune.chatbot.app import AppConfig, build_app

    fake = FakeOpenAI().__enter__()
    demo = build_app(AppConfig(api_base=fake.base, votes_path=tmp_path / "votes.jsonl", left_model="endless"))
    demo.queue(default_concurrency_limit=None)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            try:
                page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
                box = page.locator("#message textarea")
                box.wait_for(state="visible", timeout=60_000)
                left, right = page.locator("#pane-left"), page.locator("#pane-right")

                page.locator("#settings").get_by_text("Settings", exact=True).click()
                page.get_by_label("Fine-tuned only").check()
                sync_api.expect(left).to_be_hidden(timeout=10_000)
                box.fill("Only the fine-tune, please")
                box.press("Enter")
                sync_api.expect(right).to_contain_text("answer to turn 1", timeout=30_000)
                sync_api.expect(right).to_contain_text(re.compile(r"tokens in \d"), timeout=30_000)
                assert [r["model"] for r in fake.requests] == ["run-1/step_000007"]

                page.get_by_label("Side by side").check()
                sync_api.expect(left).to_be_visible(timeout=10_000)
                box.fill("Talk forever")
                box.press("Enter")
                sync_api.expect(left).to_contain_text("Partial more", timeout=30_000)
                page.locator("#stop").click()
                sync_api.expect(left).to_contain_text("⏹ stopped", timeout=10_000)
                sync_api.expect(right).to_contain_text("answer to turn 2", timeout=10_000)

                fake.__exit__(None, None, None)
                box.fill("Is anyone there?")
                box.press("Enter")
                for pane in (left, right):
                    sync_api.expect(pane).to_contain_text("Cannot reach the model endpoint", timeout=30_000)
                sync_api.expect(page.locator("#title-right")).to_contain_text("model list unavailable")
            except Exception:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "chatbot_controls_failure.png"), full_page=True)
                raise
            finally:
                browser.close()
    finally:
        demo.close()
        fake.__exit__(None, None, None)
