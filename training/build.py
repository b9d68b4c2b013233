"""`medtune data build`: tokenize prepared records into train/test splits with loss masking.

    medtune data build --dataset-path storage/datasets/pqal.jsonl --prompt-type chat \
        --model storage/models/smollm2-135m-instruct --ctx-len 512 --output-dir storage/datasets/pqal_built \
        --test-ids ../shared/datasets/pubmedqa/test_ground_truth.json

Each example holds `input_ids` and `labels`; labels are -100 on every prompt token (and on
padding, added later by `collate_batch`), so the loss is computed on the answer only. Examples
are stored unpadded; padding happens per batch. The output directory holds a `datasets`
DatasetDict (train/test), the tokenizer the ids were made with (with the seed's marker tokens
added for prompt types 2 and 3, so training and serving agree) and `card.json`, written last.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.fileio import atomic_directory, sha256_file
from medtune.training import prompts
from medtune.training.records import QARecord, read_records

log = logging.getLogger("medtune.data.build")

IGNORE_INDEX = -100
CARD_NAME = "card.json"
TOKENIZER_DIR = "tokenizer"
# An example whose prompt leaves fewer answer tokens than this is dropped, not trained on.
MIN_ANSWER_TOKENS = 8


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool


@dataclass
class BuildStats:
    truncated: int = 0
    dropped_too_long: int = 0
    lengths: list[int] = field(default_factory=list)
    answer_lengths: list[int] = field(default_factory=list)


def load_tokenizer(model: str, prompt_type: str):
    """The model's tokenizer, with a pad token and (types 2/3) the seed's marker tokens added."""
    from transformers import AutoTokenizer

    path = Path(model)
    if not path.exists() and (model.startswith((".", "/")) or model.count("/") != 1):
        raise MedtuneError(f"--model {model!r}: no such directory (import one with `medtune model import`)")
    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as err:
        raise MedtuneError(f"--model {model!r}: could not load its tokenizer ({err})") from None
    if prompt_type in ("2", "3"):
        tok.add_tokens(list(prompts.MARKER_TOKENS), special_tokens=True)
    if prompt_type == "chat" and not tok.chat_template:
        raise MedtuneError(
            f"--model {model!r} has no chat template; use --prompt-type 1, 2 or 3 for a base model"
        )
    if tok.eos_token_id is None:
        raise MedtuneError(f"--model {model!r}: its tokenizer defines no EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # labels mask padding anyway; the attention mask hides it
    if prompt_type in ("1", "2", "3"):
        # Saved with the dataset and every checkpoint: serving renders chat messages into the
        # very prompt the model was trained on.
        probe = tok("x", add_special_tokens=True)["input_ids"]
        adds_bos = tok.bos_token_id is not None and bool(probe) and probe[0] == tok.bos_token_id
        tok.chat_template = prompts.chat_template_for(prompt_type, bos=adds_bos)
    return tok


def _encode_parts(tok, prompt_type: str, question: str, context: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the answer, tokenized apart exactly as at inference."""
    if prompt_type == "chat":
        prompt_text = tok.apply_chat_template(
            prompts.chat_messages(question, context), tokenize=False, add_generation_prompt=True
        )
        full_text = tok.apply_chat_template(prompts.chat_messages(question, context, answer), tokenize=False)
        if not full_text.startswith(prompt_text):
            raise MedtuneError(
                "the model's chat template renders the prompt differently with and without the answer, "
                "so the answer tokens cannot be located; use --prompt-type 1"
            )
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        answer_ids = tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        return prompt_ids, answer_ids
    tp = prompts.text_prompt(prompt_type, question, context)
    prompt_ids = tok(tp.prompt, add_special_tokens=True)["input_ids"]
    # Some tokenizers append EOS to every encoding: the prompt must not end the sequence.
    if prompt_ids and prompt_ids[-1] == tok.eos_token_id:
        prompt_ids = prompt_ids[:-1]
    answer_ids = tok(answer + tp.answer_suffix, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt_ids, answer_ids


def encode_record(tok, rec: QARecord, prompt_type: str, ctx_len: int) -> Encoded | None:
    """Encode one record; shorten its context to fit `ctx_len`; None if it cannot fit at all."""
    answer = prompts.answer_text(rec.answer, rec.decision)
    context = rec.context
    truncated = False
    for _ in range(4):
        prompt_ids, answer_ids = _encode_parts(tok, prompt_type, rec.question, context, answer)
        overflow = len(prompt_ids) + len(answer_ids) - ctx_len
        if overflow <= 0 or not context:
            break
        # Drop the overflow (plus a margin for re-tokenisation at the cut) from the context's end.
        ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
        keep = max(0, len(ctx_ids) - overflow - 4)
        context = tok.decode(ctx_ids[:keep]).rstrip() + " ..." if keep else ""
        truncated = True
    room = ctx_len - len(prompt_ids)
    if room < min(MIN_ANSWER_TOKENS, len(answer_ids)):
        return None
    if len(answer_ids) > room:
        answer_ids = answer_ids[:room]
        truncated = True
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return Encoded(input_ids, labels, len(prompt_ids), truncated)


def check_chat_template(tok, prompt_type: str, rec: QARecord) -> None:
    """The saved chat template must render exactly the training prompt's tokens."""
    rendered = tok.apply_chat_template(
        prompts.chat_messages(rec.question, rec.context, system=None), tokenize=False, add_generation_prompt=True
    )
    expected, _ = _encode_parts(tok, prompt_type, rec.question, rec.context, "x")
    got = tok(rendered, add_special_tokens=False)["input_ids"]
    if got != expected:
        raise MedtuneError(
            f"internal: the chat template for prompt type {prompt_type} does not reproduce the training prompt "
            f"({len(got)} vs {len(expected)} tokens); please report this"
        )


def read_test_ids(path: str | Path) -> set[str]:
    """Ids from PubMedQA's test_ground_truth.json ({id: label}), a JSON list, or one id per line."""
    path = Path(path)
    if not path.is_file():
        raise MedtuneError(f"--test-ids file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise MedtuneError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None
        if isinstance(obj, dict):
            ids = {str(k) for k in obj}
        elif isinstance(obj, list):
            ids = {str(v) for v in obj}
        else:
            raise MedtuneError(f"{path}: expected a JSON object keyed by id or a list of ids")
    else:
        ids = {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
    if not ids:
        raise MedtuneError(f"{path}: no ids found")
    return ids


def split_records(
    records: list[QARecord], test_split: float, seed: int, test_ids: set[str] | None = None
) -> tuple[list[QARecord], list[QARecord]]:
    """Train/test split: by the given ids, or stratified by decision with a seeded shuffle."""
    if test_ids is not None:
        test = [r for r in records if r.id in test_ids]
        train = [r for r in records if r.id not in test_ids]
        return train, test
    rng = random.Random(seed)
    groups: dict[str | None, list[QARecord]] = {}
    for rec in records:
        groups.setdefault(rec.decision, []).append(rec)
    keys = sorted(groups, key=str)
    # Largest-remainder allocation: the test split is round(n * test_split) records in all, and
    # each decision gets its share; ties go to the rarer decision so "maybe" is not left out.
    exact = {k: len(groups[k]) * test_split for k in keys}
    quota = {k: int(exact[k]) for k in keys}
    spare = round(len(records) * test_split) - sum(quota.values())
    for k in sorted(keys, key=lambda k: (-(exact[k] - quota[k]), len(groups[k]), str(k)))[: max(spare, 0)]:
        quota[k] += 1
    train: list[QARecord] = []
    test: list[QARecord] = []
    for k in keys:
        items = groups[k][:]
        rng.shuffle(items)
        test += items[: quota[k]]
        train += items[quota[k]:]
    if test_split > 0 and not test and len(train) > 1:
        test.append(train.pop())
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _stats(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {
        "count": len(values),
        "mean": round(statistics.fmean(values), 1),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def collate_batch(features: list[dict], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad a list of built examples into tensors; padded labels are -100."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(features), longest), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
        attention[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def build(
    dataset_path: str | Path,
    prompt_type: str,
    model: str,
    output_dir: str | Path,
    ctx_len: int = 512,
    test_split: float = 0.2,
    seed: int = 42,
    test_ids_file: str | Path | None = None,
) -> dict:
    """Build the tokenized dataset; returns the card (also written to output_dir/card.json)."""
    import datasets
    from tqdm import tqdm

    problems = []
    if prompt_type not in prompts.PROMPT_TYPES:
        problems.append(f"--prompt-type {prompt_type!r} is not one of {', '.join(prompts.PROMPT_TYPES)}")
    if not 0.0 <= test_split < 1.0:
        problems.append(f"--test-split {test_split} must be in [0, 1), e.g. 0.2")
    if ctx_len < 32:
        problems.append(f"--ctx-len {ctx_len} is too small; use at least 32 (512 is typical)")
    if problems:
        raise MedtuneError("invalid arguments:\n  " + "\n  ".join(problems))

    records = read_records(dataset_path)
    test_ids = read_test_ids(test_ids_file) if test_ids_file else None
    tok = load_tokenizer(model, prompt_type)
    train_recs, test_recs = split_records(records, test_split, seed, test_ids)
    if test_ids is not None:
        found = len(test_recs)
        log.info("test split from %s: %d of %d ids found in the dataset", test_ids_file, found, len(test_ids))
        if found == 0:
            raise MedtuneError(f"--test-ids {test_ids_file}: none of its {len(test_ids)} ids occur in {dataset_path}")
    if not train_recs:
        raise MedtuneError("the train split is empty: lower --test-split or use fewer --test-ids")

    if prompt_type in ("1", "2", "3"):
        check_chat_template(tok, prompt_type, train_recs[0])
    stats = BuildStats()
    splits = {}
    split_decisions = {}
    for name, recs in (("train", train_recs), ("test", test_recs)):
        rows = {"id": [], "decision": [], "input_ids": [], "labels": [], "prompt_len": []}
        decisions: Counter = Counter()
        for rec in tqdm(recs, desc=f"build {name}", unit="ex", disable=None, mininterval=2.0):
            enc = encode_record(tok, rec, prompt_type, ctx_len)
            if enc is None:
                stats.dropped_too_long += 1
                continue
            stats.truncated += enc.truncated
            stats.lengths.append(len(enc.input_ids))
            stats.answer_lengths.append(len(enc.input_ids) - enc.prompt_len)
            rows["id"].append(rec.id)
            rows["decision"].append(rec.decision)
            rows["input_ids"].append(enc.input_ids)
            rows["labels"].append(enc.labels)
            rows["prompt_len"].append(enc.prompt_len)
            decisions[str(rec.decision)] += 1
        features = datasets.Features(
            {
                "id": datasets.Value("string"),
                "decision": datasets.Value("string"),
                "input_ids": datasets.List(datasets.Value("int32")),
                "labels": datasets.List(datasets.Value("int32")),
                "prompt_len": datasets.Value("int32"),
            }
        )
        splits[name] = datasets.Dataset.from_dict(rows, features=features)
        split_decisions[name] = dict(sorted(decisions.items()))

    card = {
        "format": "medtune-built-dataset/1",
        "source": {"path": str(dataset_path), "sha256": sha256_file(dataset_path), "records": len(records)},
        "model": str(model),
        "prompt_type": prompt_type,
        "system_prompt": prompts.SYSTEM_PROMPT if prompt_type == "chat" else None,
        "ctx_len": ctx_len,
        "seed": seed,
        "test_split": None if test_ids is not None else test_split,
        "test_ids": None if test_ids is None else {"file": str(test_ids_file), "ids": len(test_ids), "found": len(test_recs)},
        "splits": {name: {"count": len(ds), "decisions": split_decisions[name]} for name, ds in splits.items()},
        "tokens": {"total": _stats(stats.lengths), "answer": _stats(stats.answer_lengths)},
        "truncated": stats.truncated,
        "dropped_too_long": stats.dropped_too_long,
        "added_tokens": list(prompts.MARKER_TOKENS) if prompt_type in ("2", "3") else [],
        "vocab_size": len(tok),
    }
    with atomic_directory(output_dir) as tmp:
        # An empty split (--test-split 0) is left out: `datasets` cannot round-trip an empty table.
        datasets.DatasetDict({k: v for k, v in splits.items() if len(v)}).save_to_disk(str(tmp))
        tok.save_pretrained(str(tmp / TOKENIZER_DIR))
        (tmp / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def load_built(output_dir: str | Path):
    """Load a built dataset (DatasetDict) and its card; refuses a directory without card.json."""
    import datasets

    output_dir = Path(output_dir)
    card_path = output_dir / CARD_NAME
    if not card_path.is_file():
        raise MedtuneError(f"{output_dir}: not a built dataset (no {CARD_NAME}); run `medtune data build`")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    return datasets.load_from_disk(str(output_dir)), card


def format_card(card: dict, output_dir: str | Path) -> str:
    tr, te = card["splits"]["train"], card["splits"]["test"]
    tokens = card["tokens"]["total"]
    return (
        f"built {output_dir}\n"
        f"  prompt type: {card['prompt_type']}   ctx len: {card['ctx_len']}   vocab: {card['vocab_size']}\n"
        f"  train: {tr['count']} {tr['decisions']}\n"
        f"  test:  {te['count']} {te['decisions']}\n"
        f"  tokens per example: mean {tokens.get('mean')}, p95 {tokens.get('p95')}, max {tokens.get('max')}\n"
        f"  truncated: {card['truncated']}   dropped (prompt too long): {card['dropped_too_long']}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset-path", "--dataset_path", dest="dataset_path", required=True,
                        help="prepared JSONL (from `medtune data prepare`)")
    parser.add_argument("--prompt-type", "--prompt_type", dest="prompt_type", default="1",
                        choices=prompts.PROMPT_TYPES, help="1 instruction, 2/3 marker formats, chat = chat template")
    parser.add_argument("--test-split", "--test_split", dest="test_split", type=float, default=0.2,
                        help="fraction held out for test (stratified by decision); ignored with --test-ids")
    parser.add_argument("--model", "--model-name", "-mn", dest="model", required=True,
                        help="model directory or hub id whose tokenizer to use")
    parser.add_argument("--ctx-len", "--ctx_len", dest="ctx_len", type=int, default=512, help="max tokens per example")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, help="directory to write")
    parser.add_argument("--seed", type=int, default=42, help="seed for the split shuffle")
    parser.add_argument("--test-ids", "--test_ids", dest="test_ids", default=None,
                        help="file of ids forming the test split (e.g. PubMedQA test_ground_truth.json)")


def run_from_args(args: argparse.Namespace) -> int:
    card = build(
        args.dataset_path, args.prompt_type, args.model, args.output_dir,
        ctx_len=args.ctx_len, test_split=args.test_split, seed=args.seed, test_ids_file=args.test_ids,
    )
    print(format_card(card, args.output_dir))
    return 0
