"""`medtune data build`: loss masking per prompt type, splits, truncation, the saved artefacts."""

from __future__ import annotations

import json

import pytest

from medtune.cli import main
from medtune.errors import MedtuneError
from medtune.training import prompts
from medtune.training.build import IGNORE_INDEX, build, collate_batch, load_built, split_records
from medtune.training.records import QARecord, read_records

from conftest import SHARED_PUBMEDQA, qa, write_jsonl


@pytest.fixture()
def dataset(tmp_path):
    decisions = ["yes"] * 12 + ["no"] * 6 + ["maybe"] * 2
    return write_jsonl(tmp_path / "ds.jsonl", [qa(i, d) for i, d in enumerate(decisions)])


def _answer_tokens(example) -> list[int]:
    return [t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX]


@pytest.mark.parametrize("prompt_type", prompts.PROMPT_TYPES)
def test_prompt_is_masked_and_answer_is_not(tmp_path, dataset, tiny_model_dir, prompt_type):
    from transformers import AutoTokenizer

    out = tmp_path / "built"
    card = build(dataset, prompt_type, str(tiny_model_dir), out, ctx_len=512)
    ds, saved_card = load_built(out)
    assert saved_card == card
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    recs = {r.id: r for r in read_records(dataset)}
    for ex in ds["train"]:
        n = ex["prompt_len"]
        assert n > 0
        assert ex["labels"][:n] == [IGNORE_INDEX] * n, "prompt tokens must not be trained on"
        assert ex["labels"][n:] == ex["input_ids"][n:], "every answer token is trained on"
        rec = recs[ex["id"]]
        answer = tok.decode(_answer_tokens(ex), skip_special_tokens=True)
        expected = prompts.answer_text(rec.answer, rec.decision)
        assert answer.strip().startswith(rec.decision.capitalize() + ".")
        assert expected in answer
        prompt = tok.decode(ex["input_ids"][:n])
        assert rec.question in prompt
        assert rec.answer not in prompt
        if prompt_type == "3":
            assert "Methods:" not in prompt  # closed book: no context
        elif prompt_type != "3":
            assert "Methods:" in prompt
    # The sequence ends with EOS so generation learns to stop.
    assert ds["train"][0]["input_ids"][-1] in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.encode("\n", add_special_tokens=False)[-1])


def test_marker_prompt_types_add_special_tokens_saved_with_tokenizer(tmp_path, dataset, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoTokenizer

    out = tmp_path / "built"
    card = build(dataset, "2", str(tiny_model_dir), out)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert card["added_tokens"] == list(prompts.MARKER_TOKENS)
    assert card["vocab_size"] == len(tiny_tokenizer) + 4
    for marker in prompts.MARKER_TOKENS:
        ids = tok.encode(marker, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] >= len(tiny_tokenizer)
    ds, _ = load_built(out)
    ex = ds["train"][0]
    end_a = tok.convert_tokens_to_ids("<END_A>")
    assert ex["input_ids"][-2:] == [end_a, tok.eos_token_id]


def test_stratified_split_is_seeded_and_keeps_every_decision(dataset):
    recs = read_records(dataset)
    train, test = split_records(recs, 0.25, seed=1)
    assert len(train) + len(test) == len(recs) and not {r.id for r in train} & {r.id for r in test}
    assert sorted(r.decision for r in test) == ["maybe", "no", "yes", "yes", "yes"]
    again = split_records(recs, 0.25, seed=1)
    assert [r.id for r in again[1]] == [r.id for r in test]
    other = split_records(recs, 0.25, seed=2)
    assert {r.id for r in other[1]} != {r.id for r in test}


def test_test_ids_file_fixes_the_split(tmp_path, dataset, tiny_model_dir):
    ids_file = tmp_path / "test_ground_truth.json"
    ids_file.write_text(json.dumps({"r1": "yes", "r2": "yes", "r15": "no", "not-in-data": "no"}))
    out = tmp_path / "built"
    card = build(dataset, "1", str(tiny_model_dir), out, test_ids_file=ids_file)
    ds, _ = load_built(out)
    assert sorted(ds["test"]["id"]) == ["r1", "r15", "r2"]
    assert len(ds["train"]) == 17
    assert card["test_ids"] == {"file": str(ids_file), "ids": 4, "found": 3}
    lines = tmp_path / "ids.txt"
    lines.write_text("r3\nr4\n")
    card = build(dataset, "1", str(tiny_model_dir), tmp_path / "b2", test_ids_file=lines)
    assert card["splits"]["test"]["count"] == 2


def test_long_context_is_truncated_to_ctx_len(tmp_path, tiny_model_dir):
    long = qa(0, context="Results: " + "the intervention group had lower rates of infection. " * 80)
    src = write_jsonl(tmp_path / "long.jsonl", [long, qa(1), qa(2, "no"), qa(3, "no")])
    card = build(src, "1", str(tiny_model_dir), tmp_path / "built", ctx_len=128, test_split=0.0)
    ds, _ = load_built(tmp_path / "built")
    assert card["truncated"] >= 1
    ex = next(e for e in ds["train"] if e["id"] == "r0")
    assert len(ex["input_ids"]) <= 128
    assert ex["labels"][ex["prompt_len"]:] == ex["input_ids"][ex["prompt_len"]:]
    assert all(len(e["input_ids"]) <= 128 for e in ds["train"])


def test_collate_pads_labels_with_ignore_index():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    batch = collate_batch(feats, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [5, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_bad_arguments_are_all_listed(tmp_path, dataset, tiny_model_dir):
    with pytest.raises(MedtuneError) as err:
        build(dataset, "7", str(tiny_model_dir), tmp_path / "o", ctx_len=8, test_split=1.5)
    msg = str(err.value)
    assert "--prompt-type '7'" in msg and "--test-split 1.5" in msg and "--ctx-len 8" in msg
    with pytest.raises(MedtuneError, match="no such directory"):
        build(dataset, "1", str(tmp_path / "missing-model"), tmp_path / "o")
    with pytest.raises(MedtuneError, match="none of its 1 ids"):
        ids = tmp_path / "ids.txt"
        ids.write_text("zzz\n")
        build(dataset, "1", str(tiny_model_dir), tmp_path / "o", test_ids_file=ids)
    assert not (tmp_path / "o").exists()


def test_seed_flag_spellings_work(tmp_path, dataset, tiny_model_dir, capsys):
    out = tmp_path / "built"
    code = main(["data", "build", "--dataset_path", str(dataset), "--prompt_type", "3", "--test_split", "0.1",
                 "--model", str(tiny_model_dir), "--output-dir", str(out), "--ctx-len", "256"])
    assert code == 0
    assert "train: 18" in capsys.readouterr().out
    assert json.loads((out / "card.json").read_text())["prompt_type"] == "3"


@pytest.mark.integration
@pytest.mark.skipif(not (SHARED_PUBMEDQA / "ori_pqal.json").is_file(), reason="PubMedQA not present in ../shared")
def test_real_pubmedqa_official_test_split(tmp_path, tiny_model_dir):
    from medtune.training.prepare import prepare

    prepared = tmp_path / "pqal.jsonl"
    prepare(str(SHARED_PUBMEDQA / "ori_pqal.json"), prepared)
    card = build(prepared, "1", str(tiny_model_dir), tmp_path / "built", ctx_len=512,
                 test_ids_file=SHARED_PUBMEDQA / "test_ground_truth.json")
    assert card["splits"]["test"]["count"] == 500
    assert card["splits"]["train"]["count"] == 500


@pytest.mark.parametrize("prompt_type", ["1", "2", "3"])
def test_saved_chat_template_renders_the_training_prompt(tmp_path, dataset, tiny_model_dir, prompt_type):
    """Serving applies the checkpoint's chat template; it must give the tokens training saw."""
    from transformers import AutoTokenizer

    out = tmp_path / "built"
    build(dataset, prompt_type, str(tiny_model_dir), out)
    ds, _ = load_built(out)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    recs = {r.id: r for r in read_records(dataset)}
    for ex in ds["train"].select(range(3)):
        rec = recs[ex["id"]]
        messages = prompts.chat_messages(rec.question, rec.context, system="ignored system prompt")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok(text, add_special_tokens=False)["input_ids"] == ex["input_ids"][: ex["prompt_len"]]
