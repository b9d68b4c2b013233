"""Evaluation: scoring functions on hand-made cases, the test split, the side inputs, and the
pre-flight checks that must fail before any long work (no model is loaded in this file)."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from medtune.cli import main
from medtune.errors import MedtuneError
from medtune.evaluation import scoring, summaries
from medtune.evaluation.backends import HttpBackend, LocalBackend, normalise_api_base
from medtune.evaluation.pubmedqa import EvalConfig, run, select_items, validate_config

from conftest import qa, write_jsonl


# --- decision parsing (generate mode) -----------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Yes. The trial found fewer strokes.", "yes"),
    ("No, length of stay did not differ.", "no"),
    ("Maybe. The evidence is limited.", "maybe"),
    ("yes", "yes"),
    ("MAYBE!", "maybe"),
    ("**Yes**. Because ...", "yes"),
    ("  \"No\" - the data show", "no"),
    ("The answer is: No. The study ...", "no"),
    ("Answer: maybe", "maybe"),
    ("Final answer - yes", "yes"),
    ("Based on the context, yes, it does.", "yes"),
    ("The answer is: Yes, No", "yes"),  # the first decision word decides
    ("(a) yes", "yes"),
])
def test_parse_decision_reads_the_first_words(text, expected):
    assert scoring.parse_decision(text) == expected


@pytest.mark.parametrize("text", [
    "", None, "There is no evidence that it works.",  # "no" inside prose is not a decision
    "Yesterday the trial ended.", "Nope.", "Not clear from the abstract.", "I think so.",
    "The study enrolled 412 adults; yes, mortality fell.",  # the decision must come first
])
def test_parse_decision_rejects_answers_without_a_leading_decision(text):
    assert scoring.parse_decision(text) is None


# --- option probabilities (likelihood mode) -----------------------------------------------------

def test_top_logprobs_sum_case_and_space_variants():
    top = [("Yes", math.log(0.30)), (" yes", math.log(0.10)), ("No", math.log(0.20)),
           ("The", math.log(0.25)), (" NO", math.log(0.05))]
    scores = scoring.option_logprobs_from_top(top)
    assert scores["yes"] == pytest.approx(math.log(0.40))
    assert scores["no"] == pytest.approx(math.log(0.25))
    assert scores["maybe"] == -math.inf  # below the top-k cut-off
    assert scoring.pick_option(scores) == "yes"


def test_top_logprobs_without_any_decision_is_unscored():
    assert scoring.option_logprobs_from_top([("The", -0.5), ("Based", -1.2), ("yesterday", -2.0)]) is None
    assert scoring.pick_option(None) is None


def test_pick_option_takes_the_most_likely_and_breaks_ties_in_label_order():
    assert scoring.pick_option({"yes": -2.0, "no": -1.0, "maybe": -3.0}) == "no"
    assert scoring.pick_option({"yes": -1.0, "no": -1.0, "maybe": -1.0}) == "yes"
    assert scoring.pick_option({"yes": -math.inf, "no": -math.inf, "maybe": -0.1}) == "maybe"


def test_option_variants_cover_case_and_leading_space():
    assert set(scoring.option_variants("maybe")) == {"Maybe", "maybe", " Maybe", " maybe"}


# --- accuracy, macro-F1, confusion ------------------------------------------------------------

def test_classification_metrics_on_a_hand_counted_case():
    truth = ["yes", "yes", "no", "maybe", "no"]
    pred = ["yes", "no", "no", None, "no"]
    m = scoring.classification_metrics(truth, pred)
    assert m["n"] == 5 and m["invalid"] == 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    # yes: tp 1, fp 0, fn 1 -> 2/3; no: tp 2, fp 1, fn 0 -> 4/5; maybe: tp 0 -> 0.
    assert m["per_class_f1"] == pytest.approx({"yes": 2 / 3, "no": 4 / 5, "maybe": 0.0})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 3)
    assert m["confusion"]["columns"] == ["yes", "no", "maybe", "invalid"]
    assert m["confusion"]["matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]]


def test_an_unparseable_answer_is_never_a_false_positive():
    m = scoring.classification_metrics(["no", "no"], [None, "no"])
    assert m["per_class_f1"]["no"] == pytest.approx(2 / 3)  # tp 1, fn 1, fp 0
    assert m["per_class_f1"]["yes"] == 0.0


def test_vectorised_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    labels = [*scoring.LABELS, None]
    for _ in range(20):
        n = int(rng.integers(1, 40))
        truth = [scoring.LABELS[i] for i in rng.integers(0, 3, n)]
        pred = [labels[i] for i in rng.integers(0, 4, n)]
        ours = scoring._macro_f1_rows(scoring._encode(truth)[None, :], scoring._encode(pred)[None, :])[0]
        theirs = f1_score(truth, [p or "invalid" for p in pred], labels=list(scoring.LABELS), average="macro",
                          zero_division=0.0)
        assert ours == pytest.approx(theirs)


# --- bootstrap ----------------------------------------------------------------------------------

def test_bootstrap_degenerate_cases():
    truth = ["yes", "no", "maybe"] * 10
    boot = scoring.bootstrap(truth, {"a": truth, "b": list(truth)}, [("a", "b")], resamples=500, seed=1)
    assert boot["models"]["a"]["accuracy_ci"] == [1.0, 1.0]
    pair = boot["pairs"][0]
    assert pair["accuracy_diff"] == 0.0 and pair["accuracy_diff_ci"] == [0.0, 0.0]
    assert pair["p_not_better"] == 1.0 and pair["both_right"] == 30


def test_bootstrap_interval_width_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    n = 400
    truth = ["yes"] * n
    pred = ["yes" if x else "no" for x in rng.random(n) < 0.5]
    acc = sum(p == "yes" for p in pred) / n
    lo, hi = scoring.bootstrap(truth, {"a": pred}, resamples=4000, seed=2)["models"]["a"]["accuracy_ci"]
    half = 1.96 * math.sqrt(acc * (1 - acc) / n)
    assert lo < acc < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)


def test_paired_difference_is_tighter_than_the_separate_intervals():
    # b is a on every item, plus 20 more right answers out of 300: the separate intervals
    # overlap, but on the same items b is never worse, so the paired interval excludes 0.
    rng = np.random.default_rng(5)
    n = 300
    truth = list(rng.choice(scoring.LABELS, n))
    a = [t if rng.random() < 0.6 else "invalid" for t in truth]
    wrong = [i for i, p in enumerate(a) if p != truth[i]][:20]
    b = [truth[i] if i in wrong else a[i] for i in range(n)]
    boot = scoring.bootstrap(truth, {"a": a, "b": b}, [("a", "b")], resamples=2000, seed=0)
    ci_a, ci_b = boot["models"]["a"]["accuracy_ci"], boot["models"]["b"]["accuracy_ci"]
    assert ci_a[1] > ci_b[0]  # the separate intervals overlap
    pair = boot["pairs"][0]
    assert pair["accuracy_diff"] == pytest.approx(20 / n)
    assert pair["accuracy_diff_ci"][0] > 0
    assert pair["only_model_right"] == 20 and pair["only_reference_right"] == 0
    assert pair["p_not_better"] == 0.0
    # Same seed, same answer.
    assert scoring.bootstrap(truth, {"a": a, "b": b}, [("a", "b")], resamples=2000, seed=0) == boot


# --- ROUGE-L ------------------------------------------------------------------------------------

def test_rouge_l_on_hand_made_pairs():
    assert scoring.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert scoring.rouge_l("the cat sat on the mat", "dogs bark loudly") == 0.0
    # LCS "the cat on the mat" = 5 tokens; P = 5/5, R = 5/6.
    assert scoring.rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * (5 / 6) / (1 + 5 / 6))
    assert scoring.rouge_l("reduced mortality", "") == 0.0


# --- data and test split ------------------------------------------------------------------------

def _cfg(tmp_path: Path, data: Path, **kw) -> EvalConfig:
    return EvalConfig(api_base=kw.pop("api_base", "inprocess"), data=data, out=tmp_path / "out", **kw)


def _dataset(tmp_path: Path, n: int = 30) -> Path:
    decisions = ["yes", "no", "maybe"]
    return write_jsonl(tmp_path / "data.jsonl", [qa(i, decisions[i % 3] if i % 7 else "yes") for i in range(n)])


def test_default_split_is_the_one_data_build_held_out(tmp_path, tiny_model_dir):
    from datasets import load_from_disk

    from medtune.training.build import build

    data = _dataset(tmp_path)
    build(data, "chat", str(tiny_model_dir), tmp_path / "built", ctx_len=256, test_split=0.2, seed=42)
    held_out = set(load_from_disk(str(tmp_path / "built"))["test"]["id"])
    items, info = select_items(_cfg(tmp_path, data))
    assert {r.id for r in items} == held_out and len(items) == 6
    assert info["split"]["how"].startswith("seeded stratified")
    assert info["decisions"] == {d: sum(r.decision == d for r in items) for d in ("yes", "no", "maybe")}


def test_test_ids_select_items_and_count_the_missing(tmp_path):
    data = _dataset(tmp_path, 10)
    ids = tmp_path / "test_ground_truth.json"
    ids.write_text(json.dumps({"r1": "yes", "r2": "no", "r3": "maybe", "gone-1": "yes", "gone-2": "no"}))
    items, info = select_items(_cfg(tmp_path, data, test_ids=ids))
    assert [r.id for r in items] == ["r1", "r2", "r3"]
    assert info["split"] | {"file": None} == {"how": "test ids", "file": None, "ids": 5, "found": 3, "missing": 2,
                                              "unlabelled_skipped": 0}


def test_limit_takes_a_seeded_subset(tmp_path):
    data = _dataset(tmp_path, 60)
    first, _ = select_items(_cfg(tmp_path, data, limit=5))
    again, info = select_items(_cfg(tmp_path, data, limit=5))
    other, _ = select_items(_cfg(tmp_path, data, limit=5, seed=7))
    assert len(first) == 5 and [r.id for r in first] == [r.id for r in again] and info["limit"] == 5
    assert [r.id for r in other] != [r.id for r in first]


def test_items_without_a_decision_are_skipped_and_counted(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [qa(1, "yes"), qa(2, None), qa(3, "no")])
    ids = tmp_path / "ids.txt"
    ids.write_text("r1\nr2\nr3\n")
    items, info = select_items(_cfg(tmp_path, data, test_ids=ids))
    assert [r.id for r in items] == ["r1", "r3"] and info["split"]["unlabelled_skipped"] == 1


def test_data_without_decisions_fails_clearly(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [qa(i, None) for i in range(5)])
    with pytest.raises(MedtuneError, match=r"none of its 5 records has a decision"):
        select_items(_cfg(tmp_path, data))


def test_test_ids_absent_from_the_data_fail_clearly(tmp_path):
    data = _dataset(tmp_path, 5)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(["x1", "x2"]))
    with pytest.raises(MedtuneError, match=r"none of its 2 ids occur"):
        select_items(_cfg(tmp_path, data, test_ids=ids))


def test_every_bad_argument_is_reported_at_once(tmp_path):
    cfg = EvalConfig(api_base="localhost:8000", models=["base", "base"], data=tmp_path / "missing.jsonl",
                     out=tmp_path / "o", limit=0, bootstrap=10, votes=tmp_path / "v.jsonl", samples=-1)
    with pytest.raises(MedtuneError) as err:
        validate_config(cfg)
    text = str(err.value)
    for fragment in ("lists base twice", "missing.jsonl: file not found", "--limit 0", "--bootstrap 10",
                     "--votes", "--samples -1", "expected a URL"):
        assert fragment in text


# --- side inputs --------------------------------------------------------------------------------

def test_training_metrics_summary_tolerates_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"type": "train", "step": s, "epoch": s / 4, "loss": 3.0 - 0.2 * s, "tokens_per_s": 100.0 + s,
             "tokens": 100 * s, "time": 1000.0 + 10 * s} for s in range(1, 5)]
    rows.insert(2, {"type": "checkpoint", "step": 2, "path": "/s/step_000002"})
    rows.append({"type": "eval", "step": 4, "epoch": 1, "eval_loss": 2.0, "eval_perplexity": math.exp(2.0)})
    write_jsonl(path, rows + ['{"type": "train", "step": 5, "lo'])
    s = summaries.read_training_metrics(path)
    assert s["skipped_lines"] == 1 and s["steps"] == 4 and s["train_points"] == 4
    assert s["first_loss"] == pytest.approx(2.8) and s["last_loss"] == pytest.approx(2.2)
    assert s["loss_curve"][0] == [1, pytest.approx(2.8)]
    assert s["evals"] == [{"step": 4, "epoch": 1, "eval_loss": 2.0, "eval_perplexity": pytest.approx(math.exp(2.0))}]
    assert s["duration_s"] == pytest.approx(30.0) and s["last_checkpoint"] == "/s/step_000002"


def _vote(vote, winner, ckpt="run-a/step_000003"):
    return {"schema": "medtune-chat-vote/1", "vote": vote, "winner": winner,
            "models": {"left": "base", "right": ckpt}, "checkpoint": ckpt}


def test_votes_are_tallied_by_winner(tmp_path):
    path = write_jsonl(tmp_path / "votes.jsonl", [
        _vote("right", "run-a/step_000003"), _vote("right", "run-a/step_000003"), _vote("left", "base"),
        _vote("tie", None), _vote("both_bad", None), {"vote": "right", "models": {"left": "base", "right": "finetuned"}},
        _vote("right", "run-a/step_000009", ckpt="run-a/step_000009"),
    ])
    v = summaries.read_votes(path)
    assert v["votes"] == 7
    assert v["tally"] == {"run-a/step_000003": 2, "base": 1, "tie": 1, "both bad": 1, "finetuned": 1,
                          "run-a/step_000009": 1}
    assert v["by_checkpoint"]["run-a/step_000009"] == {"run-a/step_000009": 1}


def test_a_bad_votes_line_is_reported_with_its_place(tmp_path):
    path = write_jsonl(tmp_path / "votes.jsonl", [_vote("tie", None), "{not json"])
    with pytest.raises(MedtuneError, match=r"votes.jsonl:2: invalid JSON"):
        summaries.read_votes(path)
    path = write_jsonl(tmp_path / "votes2.jsonl", [{"question": "q"}])
    with pytest.raises(MedtuneError, match=r"votes2.jsonl:1: no vote"):
        summaries.read_votes(path)


# --- pre-flight: fail in seconds, before any scoring ---------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api_base_is_normalised():
    assert normalise_api_base("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalise_api_base("http://127.0.0.1:8000/") == "http://127.0.0.1:8000/v1"
    assert normalise_api_base("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert normalise_api_base("https://gw.example/llm/v1") == "https://gw.example/llm/v1"


def test_unreachable_endpoint_fails_before_any_work(tmp_path, capsys):
    data = _dataset(tmp_path, 10)
    out = tmp_path / "out"
    start = time.monotonic()
    code = main(["eval", "pubmedqa", "--api-base", f"http://127.0.0.1:{_free_port()}/v1", "--data", str(data),
                 "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot reach the endpoint" in err and "medtune serve" in err
    assert time.monotonic() - start < 30
    assert not (out / "metrics.json").exists()


class _ModelsOnly(BaseHTTPRequestHandler):
    """Answers GET /v1/models only: enough for the pre-flight, which must stop there."""

    chat_calls = 0

    def do_GET(self):
        body = json.dumps({"object": "list", "data": [
            {"id": "base", "object": "model", "created": 0, "owned_by": "medtune", "medtune": {"kind": "base"}},
            {"id": "run-a/step_000001", "object": "model", "created": 0, "owned_by": "medtune"},
        ]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        type(self).chat_calls += 1
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def models_only_server():
    _ModelsOnly.chat_calls = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ModelsOnly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_unknown_model_id_fails_listing_the_served_ones(tmp_path, models_only_server, capsys):
    data = _dataset(tmp_path, 10)
    code = main(["eval", "pubmedqa", "--api-base", models_only_server, "--models", "base,finetuned",
                 "--data", str(data), "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "finetuned not served" in err and "available: base, run-a/step_000001" in err and "make train" in err
    assert _ModelsOnly.chat_calls == 0


def test_a_failing_endpoint_stops_the_run_without_draining_the_queue(tmp_path, models_only_server):
    data = _dataset(tmp_path, 200)  # 40 test items
    cfg = _cfg(tmp_path, data, api_base=models_only_server, models=["base"], mode="likelihood", concurrency=2)
    with pytest.raises(MedtuneError, match=r"model 'base' answered 500 .*stopping"):
        run(cfg)
    # Each request is tried 3 times (2 retries); the two in flight finish, the queued ones never start.
    assert _ModelsOnly.chat_calls <= 2 * 3 * 2
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_model_metadata_comes_from_the_models_list(models_only_server):
    infos = HttpBackend(models_only_server).preflight(["base", "run-a/step_000001"])
    assert infos["base"].kind == "base" and infos["run-a/step_000001"].kind == "finetuned"


def test_inprocess_unknown_model_and_missing_checkpoint_fail_before_loading(tmp_path, tiny_model_dir):
    backend = LocalBackend(tmp_path / "empty-storage", base_model=tiny_model_dir)
    with pytest.raises(MedtuneError) as err:
        backend.preflight(["base", "finetuned", "run-x/step_1", "nonsense"])
    text = str(err.value)
    assert "finetuned: no checkpoint" in text and "run-x/step_1: unknown model id (available: base)" in text
    assert "nonsense: unknown model id" in text
    assert backend.loaded == {}


def test_inprocess_needs_a_base_model_when_no_checkpoint_names_one(tmp_path):
    with pytest.raises(MedtuneError, match=r"pass --base-model"):
        LocalBackend(tmp_path / "empty").preflight(["base"])


def test_run_validates_before_touching_the_endpoint(tmp_path, models_only_server):
    data = write_jsonl(tmp_path / "d.jsonl", [qa(i, None) for i in range(3)])
    with pytest.raises(MedtuneError, match="has a decision"):
        run(_cfg(tmp_path, data, api_base=models_only_server, models=["base"]))
    assert _ModelsOnly.chat_calls == 0


def test_help_lists_the_pubmedqa_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "pubmedqa", "--help"])
    out = capsys.readouterr().out
    for flag in ("--api-base", "--models", "--data", "--test-ids", "--limit", "--mode", "--out", "inprocess"):
        assert flag in out
