"""`medtune data prepare`: every accepted source shape, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtune.cli import main
from medtune.errors import MedtuneError
from medtune.training.prepare import prepare
from medtune.training.records import read_records

from conftest import SHARED_PUBMEDQA, qa, write_jsonl


def _pqal(n: int) -> dict:
    decisions = ["yes", "no", "maybe"]
    return {
        str(1000 + i): {
            "QUESTION": f"Is biomarker {i} predictive of outcome?",
            "CONTEXTS": [f"Background sentence {i}.", f"Results sentence {i}."],
            "LABELS": ["BACKGROUND", "RESULTS"],
            "MESHES": ["Humans"],
            "YEAR": "2001",
            "reasoning_required_pred": "yes",
            "reasoning_free_pred": "yes",
            "final_decision": decisions[i % 3],
            "LONG_ANSWER": f"Biomarker {i} was associated with outcome.",
        }
        for i in range(n)
    }


def test_original_pubmedqa_json(tmp_path):
    src = tmp_path / "ori_pqal.json"
    src.write_text(json.dumps(_pqal(6)))
    out = tmp_path / "out.jsonl"
    summary = prepare(str(src), out)
    assert (summary.read, summary.written) == (6, 6)
    assert dict(summary.decisions) == {"yes": 2, "no": 2, "maybe": 2}
    recs = read_records(out)
    assert recs[0].id == "1000"
    assert recs[0].answer == "Biomarker 0 was associated with outcome."
    # Context paragraphs stay apart (the seed glued "sentence 0.Results").
    assert recs[0].context == "Background sentence 0.\nResults sentence 0."
    assert set(json.loads(out.read_text().splitlines()[0])) == {"id", "question", "context", "answer", "decision"}


def _hf_rows(n: int) -> list[dict]:
    return [
        {
            "pubid": 2000 + i,
            "question": f"Does drug {i} work?",
            "context": {"contexts": [f"Part A {i}.", f"Part B {i}."], "labels": ["A", "B"], "meshes": []},
            "long_answer": f"Drug {i} worked in most patients.",
            "final_decision": "no" if i % 2 else "yes",
        }
        for i in range(n)
    ]


def test_hf_export_jsonl(tmp_path):
    src = write_jsonl(tmp_path / "pqa.jsonl", _hf_rows(4))
    out = tmp_path / "out.jsonl"
    summary = prepare(str(src), out)
    assert summary.written == 4
    rec = read_records(out)[1]
    assert (rec.id, rec.decision, rec.context) == ("2001", "no", "Part A 1.\nPart B 1.")


def test_hf_export_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(_hf_rows(5)), src)
    out = tmp_path / "out.jsonl"
    assert prepare(str(src), out).written == 5
    assert read_records(out)[4].question == "Does drug 4 work?"


def test_seed_jsonl_gets_stable_ids_and_duplicates_are_dropped(tmp_path):
    rows = [{"question": "Q one?", "context": "C one.", "answer": "A one."},
            {"question": "Q two?", "context": ["C", "two."], "answer": "A two."},
            {"question": "Q one?", "context": "C one.", "answer": "A one again."}]
    src = write_jsonl(tmp_path / "seed.jsonl", rows)
    out = tmp_path / "out.jsonl"
    summary = prepare(str(src), out)
    assert (summary.read, summary.written, summary.duplicates) == (3, 2, 1)
    recs = read_records(out)
    assert recs[0].id.startswith("q-") and recs[0].decision is None
    assert recs[1].context == "C\ntwo."
    # Ids depend on content only: preparing again gives the same ids.
    assert [r.id for r in read_records(out)] == [r.id for r in recs]


def test_own_output_is_accepted_and_decisions_normalised(tmp_path):
    src = write_jsonl(tmp_path / "mine.jsonl", [qa(1, "Yes"), qa(2, " MAYBE "), qa(3, None)])
    out = tmp_path / "out.jsonl"
    summary = prepare(str(src), out)
    assert dict(summary.decisions) == {"yes": 1, "maybe": 1, None: 1}


def test_limit(tmp_path):
    src = write_jsonl(tmp_path / "mine.jsonl", [qa(i) for i in range(10)])
    assert prepare(str(src), tmp_path / "out.jsonl", limit=3).written == 3
    with pytest.raises(MedtuneError, match="--limit"):
        prepare(str(src), tmp_path / "out2.jsonl", limit=0)


def test_missing_file(tmp_path):
    with pytest.raises(MedtuneError, match="source not found: .*nope.json"):
        prepare(str(tmp_path / "nope.json"), tmp_path / "out.jsonl")


def test_truncated_json_names_the_place_and_writes_nothing(tmp_path):
    text = json.dumps(_pqal(20), indent=1)
    src = tmp_path / "ori_pqal.json"
    src.write_text(text[: len(text) // 2])
    out = tmp_path / "out.jsonl"
    with pytest.raises(MedtuneError) as err:
        prepare(str(src), out)
    msg = str(err.value)
    assert f"{src}:" in msg and "invalid JSON" in msg and "truncated" in msg
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [src]  # no temp files left behind either


def test_broken_jsonl_line_names_file_and_line_and_keeps_old_output(tmp_path):
    lines = [json.dumps(qa(1)), json.dumps(qa(2)), '{"id": "r3", "question": "cut', json.dumps(qa(4))]
    src = write_jsonl(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "out.jsonl"
    out.write_text("previous good output\n")
    with pytest.raises(MedtuneError, match=rf"{src}:3: invalid JSON"):
        prepare(str(src), out)
    assert out.read_text() == "previous good output\n"


def test_cli_reports_error_and_exit_code(tmp_path, capsys):
    src = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(qa(1)), "not json"])
    code = main(["data", "prepare", "--source", str(src), "--output", str(tmp_path / "o.jsonl")])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{src}:2" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": "x", "question": "", "context": "c", "answer": "a"}, "'question' is empty"),
        ({"id": "x", "question": "q?", "context": "c"}, "'answer' is missing"),
        ({"id": "x", "question": "q?", "context": "c", "answer": "a", "decision": "perhaps"}, "'perhaps', expected one of yes/no/maybe"),
        ({"id": "x", "question": "q?", "answer": "a", "colour": "red"}, "unexpected field"),
        ({"title": "no question here"}, "unrecognised record"),
        (["a", "list"], "expected a JSON object"),
    ],
)
def test_invalid_records(tmp_path, record, message):
    src = write_jsonl(tmp_path / "in.jsonl", [qa(0), record])
    with pytest.raises(MedtuneError, match=message) as err:
        prepare(str(src), tmp_path / "out.jsonl")
    assert f"{src}:2" in str(err.value)


def test_pubmedqa_record_without_answer_names_the_record(tmp_path):
    data = _pqal(3)
    del data["1001"]["LONG_ANSWER"]
    src = tmp_path / "ori_pqal.json"
    src.write_text(json.dumps(data))
    with pytest.raises(MedtuneError, match=r"record '1001': 'answer' is missing"):
        prepare(str(src), tmp_path / "out.jsonl")


def test_non_utf8_bytes(tmp_path):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(json.dumps(qa(1)).encode() + b"\n" + json.dumps(qa(2)).replace("sepsis", "s\xe9psis").encode("latin-1") + b"\n")
    with pytest.raises(MedtuneError, match=rf"{src}:2: bytes are not valid UTF-8"):
        prepare(str(src), tmp_path / "out.jsonl")
    json_src = tmp_path / "latin1.json"
    json_src.write_bytes(b'{"1": {"QUESTION": "caf\xe9?"}}')
    with pytest.raises(MedtuneError, match="not valid UTF-8"):
        prepare(str(json_src), tmp_path / "out.jsonl")


def test_skip_bad_lines_counts_and_continues(tmp_path):
    rows = [json.dumps(qa(1)), "garbage", json.dumps(qa(2, "perhaps")), json.dumps(qa(3)), json.dumps(qa(3))]
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(("\n".join(rows[:2]) + "\n").encode() + b"\xff\xfe\n" + ("\n".join(rows[2:]) + "\n").encode())
    summary = prepare(str(src), tmp_path / "out.jsonl", skip_bad_lines=True)
    assert (summary.read, summary.written, summary.skipped_bad, summary.duplicates) == (6, 2, 3, 1)
    assert "skipped:    3 bad, 1 duplicate ids" in summary.format()


def test_all_bad_writes_nothing(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", ["x", "y"])
    with pytest.raises(MedtuneError, match="no usable records"):
        prepare(str(src), tmp_path / "out.jsonl", skip_bad_lines=True)
    assert not (tmp_path / "out.jsonl").exists()


def test_shipped_sample_dataset_is_valid():
    from medtune.demo import sample_dataset_path

    recs = read_records(sample_dataset_path())
    assert len(recs) >= 150
    decisions = {r.decision for r in recs}
    assert decisions == {"yes", "no", "maybe"}
    assert len({r.question for r in recs}) == len(recs)


@pytest.mark.integration
@pytest.mark.skipif(not (SHARED_PUBMEDQA / "ori_pqal.json").is_file(), reason="PubMedQA not present in ../shared")
def test_real_pubmedqa_labelled(tmp_path):
    out = tmp_path / "pqal.jsonl"
    code = main(["data", "prepare", "--source", str(SHARED_PUBMEDQA / "ori_pqal.json"), "--output", str(out)])
    assert code == 0
    recs = read_records(out)
    assert len(recs) == 1000
    counts = {d: sum(r.decision == d for r in recs) for d in ("yes", "no", "maybe")}
    assert counts == {"yes": 552, "no": 338, "maybe": 110}
    assert all("\n" in r.context or len(r.context) > 0 for r in recs)
