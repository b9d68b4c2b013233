"""Evaluation end to end on a tiny random Llama and a LoRA checkpoint published through the
storage contract: in process (transformers + PEFT), and over HTTP against a live `medtune serve`
(transformers engine, started as a subprocess, polled on /health). Both write all the outputs;
the in-process scores are checked against a plain, cache-free forward pass, and the two paths
must generate the same greedy answers for the same items.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from medtune.cli import main

from conftest import publish_lora_checkpoint, qa, write_jsonl

pytestmark = pytest.mark.integration

RUN_ID = "run-a"
STEP = 3
SERVE_READY_S = 180
DECISIONS = ["yes", "no", "maybe"]
COMMON = ["--models", "base,finetuned", "--mode", "both", "--limit", "5", "--samples", "2", "--max-tokens", "6",
          "--sample-max-tokens", "8", "--bootstrap", "300"]


def records() -> list[dict]:
    # Short contexts: the tiny model has 1024 positions.
    return [qa(i, DECISIONS[i % 3]) for i in range(12)]


def train_answer_format(model_dir: Path, out: Path, steps: int = 60) -> Path:
    """The tiny random Llama taught the answer format ("Yes. ...") on the test records, about a
    second of plain torch: so decisions appear among its top tokens and its answers parse, and
    the HTTP and in-process paths are compared on answers that are not empty noise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.training import prompts
    from medtune.training.records import QARecord

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    examples = []
    for rec in map(QARecord.model_validate, records()):
        prompt = tok.apply_chat_template(prompts.chat_messages(rec.question, rec.context), tokenize=False,
                                         add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(prompts.answer_text(rec.answer, rec.decision), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append((p_ids, a_ids))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        p_ids, a_ids = examples[step % len(examples)]
        loss = model(input_ids=torch.tensor([p_ids + a_ids]), labels=torch.tensor([[-100] * len(p_ids) + a_ids])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """Storage with one LoRA checkpoint and its run's metrics.jsonl; 12 labelled records; votes."""
    tmp = tmp_path_factory.mktemp("eval")
    base = train_answer_format(tiny_model_dir, tmp / "tiny-qa")
    storage = tmp / "storage"
    ckpt = publish_lora_checkpoint(storage, base, run_id=RUN_ID, step=STEP, seed=1)
    write_jsonl(ckpt.parent / "metrics.jsonl", [
        *({"type": "train", "step": s, "epoch": s / STEP, "loss": 3.0 / s, "tokens_per_s": 50.0, "tokens": 64 * s,
           "time": 100.0 + s} for s in range(1, STEP + 1)),
        {"type": "eval", "step": STEP, "epoch": 1, "eval_loss": 1.5, "eval_perplexity": math.exp(1.5)},
    ])
    data = write_jsonl(tmp / "data.jsonl", records())
    test_ids = tmp / "test_ids.json"
    test_ids.write_text(json.dumps({f"r{i}": DECISIONS[i % 3] for i in range(1, 12, 2)}))
    votes = write_jsonl(tmp / "votes.jsonl", [
        {"vote": "right", "winner": f"{RUN_ID}/step_{STEP}", "models": {"left": "base", "right": f"{RUN_ID}/step_{STEP}"},
         "checkpoint": f"{RUN_ID}/step_{STEP}"},
        {"vote": "tie", "winner": None, "models": {"left": "base", "right": f"{RUN_ID}/step_{STEP}"},
         "checkpoint": f"{RUN_ID}/step_{STEP}"},
    ])
    return {"tmp": tmp, "storage": storage, "ckpt": ckpt, "data": data, "test_ids": test_ids, "votes": votes,
            "base": base}


def _outputs(out: Path) -> tuple[dict, list[dict], str, str]:
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics, rows, (out / "report.md").read_text(), (out / "report.html").read_text()


@pytest.fixture(scope="module")
def inprocess_run(setup):
    out = setup["tmp"] / "out-inprocess"
    code = main(["eval", "pubmedqa", "--api-base", "inprocess", "--storage", str(setup["storage"]),
                 "--data", str(setup["data"]), "--test-ids", str(setup["test_ids"]), "--votes", str(setup["votes"]),
                 *COMMON, "--out", str(out)])
    assert code == 0
    return _outputs(out)


def _check_outputs(metrics: dict, rows: list[dict], md: str, html: str, setup: dict) -> None:
    assert set(metrics["results"]) == {"likelihood", "generate"}
    for mode, block in metrics["results"].items():
        assert set(block["models"]) == {"base", "finetuned"}
        for name, r in block["models"].items():
            assert r["n"] == 5
            assert sum(map(sum, r["confusion"]["matrix"])) == 5
            lo, hi = r["accuracy_ci"]
            assert 0.0 <= lo <= r["accuracy"] <= hi <= 1.0
        (pair,) = block["comparisons"]
        assert (pair["reference"], pair["model"]) == ("base", "finetuned")
        assert pair["accuracy_diff"] == pytest.approx(block["models"]["finetuned"]["accuracy"] - block["models"]["base"]["accuracy"])
    assert metrics["data"]["split"]["found"] == 6 and metrics["data"]["items"] == 5
    assert metrics["models"]["finetuned"]["checkpoint"] == f"{RUN_ID}/step_{STEP}"
    # 5 items x 2 models x 2 modes, every one with a prediction field (None = unscored/unparseable).
    assert len(rows) == 20 and all("prediction" in r for r in rows)
    assert {r["id"] for r in rows} <= {f"r{i}" for i in range(1, 12, 2)}
    assert len(metrics["samples"]) == 2
    for sample in metrics["samples"]:
        assert set(sample["answers"]) == {"base", "finetuned"}
        assert sample["reference"].startswith(sample["decision"].capitalize() + ". ")
        assert all(0.0 <= a["rouge_l"] <= 1.0 for a in sample["answers"].values())
    assert metrics["training"]["steps"] == STEP and metrics["training"]["evals"][0]["eval_loss"] == 1.5
    assert metrics["votes"]["tally"] == {f"{RUN_ID}/step_{STEP}": 1, "tie": 1}
    for text in (md, html):
        assert "Paired difference against" in text and metrics["samples"][0]["question"] in text
        assert "Training" in text and "1.500" in text and "Chatbot votes" in text
    assert html.count("data:image/png;base64,") == 2  # accuracy with error bars, loss curve
    assert "| finetuned | " in md


def test_inprocess_run_writes_all_outputs(inprocess_run, setup):
    metrics, rows, md, html = inprocess_run
    _check_outputs(metrics, rows, md, html, setup)
    assert metrics["backend"] == "inprocess" and "full log-likelihood" in metrics["method"]["likelihood"]
    # Full log-likelihood has no top-k cut-off: every item is scored.
    assert all(r["unscored"] == 0 for r in metrics["results"]["likelihood"]["models"].values())
    # A random LoRA moves the scores: the fine-tune is not silently the base model.
    lik = {(r["model"], r["id"]): r["logprobs"] for r in rows if r["mode"] == "likelihood"}
    assert any(lik[("base", i)] != lik[("finetuned", i)] for (_m, i) in lik)


def _plain_scores(model, tok, messages) -> dict[str, float]:
    """Cache-free reference: log P(variant | prompt) from one forward pass over prompt + variant."""
    import torch

    from medtune.evaluation.scoring import LABELS, option_variants

    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    scores = {}
    for label in LABELS:
        per_variant = []
        for variant in option_variants(label):
            cont = tok(variant, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([prompt + cont])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            per_variant.append(sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont)))
        scores[label] = math.log(sum(math.exp(v) for v in per_variant))
    return scores


def test_inprocess_likelihood_equals_a_plain_forward_pass(setup):
    """The KV-cache shortcut for multi-token variants, the merged adapter, and the base model
    recovered after unmerging all give what a plain forward pass gives."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.evaluation.backends import LocalBackend
    from medtune.evaluation.pubmedqa import messages_for
    from medtune.training.records import read_records

    recs = read_records(setup["data"])[:2]
    backend = LocalBackend(setup["storage"])
    by_id = f"{RUN_ID}/step_{STEP}"  # the same checkpoint by its id: a second adapter on the shared weights
    backend.preflight(["base", "finetuned", by_id])
    # Adapter to adapter (one unmerged before the other merges), then base, then an adapter again.
    got = {(name, r.id): backend.likelihood(name, messages_for(r)).logprobs
           for name in ("finetuned", by_id, "base", "finetuned") for r in recs}
    tok = AutoTokenizer.from_pretrained(setup["base"])
    base = AutoModelForCausalLM.from_pretrained(setup["base"]).eval()
    expected_base = {r.id: _plain_scores(base, tok, messages_for(r)) for r in recs}
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["base"]), str(setup["ckpt"])).eval()
    expected_tuned = {r.id: _plain_scores(tuned, AutoTokenizer.from_pretrained(setup["ckpt"]), messages_for(r)) for r in recs}
    for r in recs:
        assert got[("base", r.id)] == pytest.approx(expected_base[r.id], abs=1e-4)
        assert got[("finetuned", r.id)] == pytest.approx(expected_tuned[r.id], abs=1e-4)
        assert got[(by_id, r.id)] == pytest.approx(expected_tuned[r.id], abs=1e-4)
        assert expected_base[r.id] != pytest.approx(expected_tuned[r.id], abs=1e-4)


# --- over HTTP, against a live `medtune serve` ---------------------------------------------------

@pytest.fixture(scope="module")
def live_serve(setup):
    pytest.importorskip("medtune.serving.cli", reason="medtune serve is not part of this build")
    from medtune.serving.launch import serve_process

    # float32 like the in-process run (the shipped config serves bfloat16), and the tiny model's context.
    config = setup["tmp"] / "serve.yaml"
    config.write_text(f"base_model: {setup['base']}\nengine: transformers\ndtype: float32\nmax_model_len: 1024\n"
                      "max_tokens_cap: 256\ndefault_max_tokens: 64\n", encoding="utf-8")
    args = ["--config", str(config), "--storage", str(setup["storage"]), "--guardrails", "none"]
    with serve_process(args, log=setup["tmp"] / "serve.log", timeout=SERVE_READY_S,
                       env={"RAY_DEDUP_LOGS": "0", "MEDTUNE_API_KEY": None}) as server:
        yield server.url + "/v1"


@pytest.fixture(scope="module")
def http_run(setup, live_serve):
    out = setup["tmp"] / "out-http"
    code = main(["eval", "pubmedqa", "--api-base", live_serve, "--storage", str(setup["storage"]),
                 "--data", str(setup["data"]), "--test-ids", str(setup["test_ids"]), "--votes", str(setup["votes"]),
                 *COMMON, "--out", str(out)])
    assert code == 0
    return _outputs(out)


def test_http_run_writes_all_outputs(http_run, setup):
    metrics, rows, md, html = http_run
    _check_outputs(metrics, rows, md, html, setup)
    assert metrics["backend"] == "http" and "logprob_token_ids" in metrics["method"]["likelihood"]
    assert metrics["models"]["finetuned"]["kind"] == "finetuned"
    # The training log is found through the checkpoint id /v1/models reports.
    assert metrics["training"]["file"].endswith(f"{RUN_ID}/metrics.jsonl")
    for r in metrics["results"]["likelihood"]["models"].values():
        assert r["unscored"] == 0  # the full likelihood of every decision, as in-process


def test_http_and_inprocess_agree(http_run, inprocess_run):
    """Same weights, same chat templates: greedy answers agree token for token, and the HTTP
    likelihood (logprob_token_ids over the whole vocabulary) equals the in-process one."""
    def by_key(rows, mode):
        return {(r["model"], r["id"]): r for r in rows if r["mode"] == mode}

    def norm(text):
        # The server holds back a trailing partial UTF-8 character; a local decode shows U+FFFD.
        return text.replace("\ufffd", "").strip()

    http_gen, local_gen = by_key(http_run[1], "generate"), by_key(inprocess_run[1], "generate")
    assert http_gen.keys() == local_gen.keys()
    assert {k: norm(r["text"]) for k, r in http_gen.items()} == {k: norm(r["text"]) for k, r in local_gen.items()}
    # Not a vacuous comparison: the tiny model learnt the format, so most answers parse.
    assert sum(r["prediction"] is not None for r in local_gen.values()) >= len(local_gen) // 2
    assert [r["prediction"] for r in http_gen.values()] == [local_gen[k]["prediction"] for k in http_gen]

    http_lik, local_lik = by_key(http_run[1], "likelihood"), by_key(inprocess_run[1], "likelihood")
    assert http_lik.keys() == local_lik.keys()
    for k, row in http_lik.items():  # exact: every variant of every decision, over the whole vocabulary
        assert row["logprobs"] == pytest.approx(local_lik[k]["logprobs"], abs=1e-3), k
        assert row["prediction"] == local_lik[k]["prediction"]


def test_http_likelihood_multi_token_variants_and_the_top_k_fallback(setup, live_serve):
    """The tiny tokenizer splits some decision words into several tokens: those take the
    continuation request (continue_final_message + prompt_logprobs) and still match in-process;
    without /tokenize (another server) the top-20 first-token path is used, a lower bound."""
    from medtune.evaluation.backends import HttpBackend, LocalBackend
    from medtune.evaluation.pubmedqa import messages_for
    from medtune.training.records import read_records

    recs = read_records(setup["data"])[:2]
    http = HttpBackend(live_serve)
    local = LocalBackend(setup["storage"])
    local.preflight(["finetuned"])
    variants = http.variants("finetuned")
    assert any(len(ids) > 1 for forms in variants.values() for ids, _ in forms), variants
    for r in recs:
        exact = http.likelihood("finetuned", messages_for(r)).logprobs
        assert exact == pytest.approx(local.likelihood("finetuned", messages_for(r)).logprobs, abs=1e-3)
        top = http._top_k_likelihood("finetuned", messages_for(r)).logprobs or {}
        for option, lp in top.items():
            assert lp <= exact[option] + 1e-4
    http.close()


def test_unknown_model_against_the_live_server_lists_what_it_serves(setup, live_serve, capsys):
    code = main(["eval", "pubmedqa", "--api-base", live_serve, "--models", "base,no-such-model",
                 "--data", str(setup["data"]), "--out", str(setup["tmp"] / "out-bad")])
    assert code == 1
    err = capsys.readouterr().err
    assert "no-such-model not served" in err
    assert f"available: base, finetuned, {RUN_ID}/step_{STEP}" in err
