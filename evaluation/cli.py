r"""`medtune eval pubmedqa`: PubMedQA accuracy, base vs fine-tuned, with side-by-side samples.

    medtune serve &     # then, once GET /health answers 200:
    medtune eval pubmedqa --api-base http://127.0.0.1:8000/v1 --models base,finetuned \
        --data storage/datasets/sample.jsonl --mode both --out storage/eval/sample
    medtune eval pubmedqa --api-base inprocess --storage storage --models base,finetuned \
        --data pqal.jsonl --test-ids ../shared/datasets/pubmedqa/test_ground_truth.json \
        --mode likelihood --out storage/eval/pqal      # no server: the models load in this process
    make eval           # the sample data's test split against the local endpoint (EVAL_ARGS=...)

Test split: the ids of --test-ids (PubMedQA's official test_ground_truth.json), else the seeded
stratified split of `medtune data build` (--test-split 0.2 --seed 42, its defaults).

Modes: `likelihood` picks the most probable of yes/no/maybe after the prompt (over HTTP from the
top-20 log-probabilities of the first answer token; in process from the full log-likelihood of
each decision word); `generate` parses the decision from a greedy answer and counts the
unparseable ones; `both` reports both (base models often fail the format, not the question).

Writes to --out: report.md, report.html (plots), metrics.json (every figure, the method used),
predictions.jsonl (every item's prediction). Accuracy and macro-F1 carry 95% bootstrap intervals;
each model after the first gets the paired difference against the first, with its interval.
The API key, if the server wants one, comes from MEDTUNE_API_KEY.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medtune.evaluation.backends import INPROCESS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="{pubmedqa}", required=True)
    p = sub.add_parser("pubmedqa", help="accuracy / macro-F1 / confusion, base vs fine-tuned, samples, report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_argument_group("models")
    where.add_argument("--api-base", required=True,
                       help=f"OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1; or '{INPROCESS}' to load "
                            "the models here with transformers + PEFT")
    where.add_argument("--models", default="base,finetuned",
                       help="comma-separated model ids (default base,finetuned); the first is the reference")
    where.add_argument("--storage", type=Path, default=None,
                       help="checkpoint storage: in-process models and the training log (default $MEDTUNE_STORAGE or ./storage)")
    where.add_argument("--base-model", type=Path, default=None,
                       help="in-process: base model directory (default: the checkpoint MANIFEST's base_model)")
    where.add_argument("--checkpoint", type=Path, default=None,
                       help="in-process: checkpoint directory for 'finetuned' (default: the storage's LATEST)")
    where.add_argument("--dtype", default="float32", choices=("float32", "bf16"), help="in-process weights dtype")
    where.add_argument("--concurrency", type=int, default=4, help="HTTP requests in flight (default 4)")
    where.add_argument("--timeout", type=float, default=120.0, help="HTTP timeout per request in seconds")

    data = p.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help="prepared JSONL with decisions (`medtune data prepare`)")
    data.add_argument("--test-ids", "--test_ids", dest="test_ids", type=Path, default=None,
                      help="test split ids, e.g. PubMedQA's test_ground_truth.json")
    data.add_argument("--test-split", "--test_split", dest="test_split", type=float, default=0.2,
                      help="without --test-ids: the stratified share `data build` held out (default 0.2)")
    data.add_argument("--seed", type=int, default=42, help="split, --limit subset and samples seed (default 42)")
    data.add_argument("--limit", type=int, default=None, help="score a seeded random subset of N test items")

    how = p.add_argument_group("scoring and report")
    how.add_argument("--mode", default="both", choices=("likelihood", "generate", "both"))
    how.add_argument("--max-tokens", type=int, default=64, help="generate mode: tokens per answer (default 64)")
    how.add_argument("--samples", type=int, default=5, help="side-by-side samples in the report (default 5)")
    how.add_argument("--sample-max-tokens", type=int, default=160, help="tokens per sample answer (default 160)")
    how.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    how.add_argument("--metrics", type=Path, default=None,
                     help="training metrics.jsonl (default: the fine-tuned checkpoint's run in --storage)")
    how.add_argument("--votes", type=Path, default=None, help="the chatbot's votes file (JSONL) to tally")
    how.add_argument("--out", type=Path, required=True, help="output directory")


def config_from_args(args: argparse.Namespace):
    from medtune.evaluation.pubmedqa import EvalConfig

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    return EvalConfig(
        api_base=args.api_base, models=models, data=args.data, out=args.out, test_ids=args.test_ids,
        test_split=args.test_split, seed=args.seed, limit=args.limit, mode=args.mode, max_tokens=args.max_tokens,
        samples=args.samples, sample_max_tokens=args.sample_max_tokens, bootstrap=args.bootstrap,
        concurrency=args.concurrency, timeout=args.timeout, storage=args.storage, base_model=args.base_model,
        checkpoint=args.checkpoint, dtype=args.dtype, metrics=args.metrics, votes=args.votes,
    )


def format_summary(result: dict) -> str:
    from medtune.evaluation.report import ci, pct, signed

    lines = [f"pubmedqa: {result['data']['items']} items, endpoint {result['endpoint']}"]
    for mode, block in result["results"].items():
        for name, r in block["models"].items():
            missing = r.get("unscored", r.get("unparseable", 0))
            label = "unscored" if mode == "likelihood" else "unparseable"
            lines.append(f"  {mode:<10} {name:<14} accuracy {pct(r['accuracy'])} [{ci(r.get('accuracy_ci'))}]  "
                         f"macro-F1 {pct(r['macro_f1'])}  {label} {missing}")
        for c in block["comparisons"]:
            lines.append(f"  {mode:<10} {c['model']} - {c['reference']}: {signed(c['accuracy_diff'])} "
                         f"[{ci(c['accuracy_diff_ci'])}]")
    lines.append(f"  took {result['timing']['total_s']:.1f} s; wrote " + ", ".join(result["files"].values()))
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    from medtune.evaluation.pubmedqa import run

    result = run(config_from_args(args))
    print(format_summary(result))
    return 0
