"""Chat with the base model and the fine-tune side by side (a Gradio app on the OpenAI endpoint).

    medtune chat                                   # endpoint http://127.0.0.1:8000/v1, app on 127.0.0.1:7860
    medtune chat --api-base http://HOST:8000/v1    # or MEDTUNE_API_BASE
    medtune chat --api-base http://svc:8000/v1 --host 0.0.0.0 --port 7860   # in a cluster

Each question goes to both models at once and both answers stream in, each with its time to first
token and tokens/s; each pane keeps its own conversation. Votes (left better / right better / tie /
both bad) are appended to a JSONL file the evaluation report tallies (--votes; default
<storage>/chat/votes.jsonl, storage from MEDTUNE_STORAGE or ./storage). The API key, when the server
needs one, comes from MEDTUNE_API_KEY or --api-key-file, never from the command line.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from medtune.errors import MedtuneError


def default_votes_path() -> Path:
    return Path(os.environ.get("MEDTUNE_STORAGE") or "storage") / "chat" / "votes.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-base", default=None,
                        help="OpenAI-compatible endpoint (default: $MEDTUNE_API_BASE or http://127.0.0.1:8000/v1)")
    parser.add_argument("--api-key-file", type=Path, default=None,
                        help="file holding the API key (default: $MEDTUNE_API_KEY, or none)")
    parser.add_argument("--host", default="127.0.0.1", help="address the app binds (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port of the app (default 7860)")
    parser.add_argument("--votes", type=Path, default=None,
                        help="JSONL file votes are appended to (default <storage>/chat/votes.jsonl)")
    parser.add_argument("--left-model", default="base", help="model id of the left pane (default base)")
    parser.add_argument("--right-model", default="finetuned",
                        help="model id of the right pane (default finetuned, pinned to its checkpoint)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the endpoint (per read while streaming; default 120)")
    parser.add_argument("--max-history-turns", type=int, default=10,
                        help="earlier turns each pane sends back to its model (default 10)")
    parser.add_argument("--max-tokens", type=int, default=256, help="initial max tokens setting (default 256)")


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise MedtuneError(f"--api-key-file {args.api_key_file}: cannot read it ({err.strerror})") from None
        if not key:
            raise MedtuneError(f"--api-key-file {args.api_key_file}: the file is empty; put the key in it")
        return key
    return os.environ.get("MEDTUNE_API_KEY") or None


def config_from_args(args: argparse.Namespace):
    from medtune.chatbot.app import AppConfig
    from medtune.chatbot.client import DEFAULT_API_BASE

    api_base = args.api_base or os.environ.get("MEDTUNE_API_BASE") or DEFAULT_API_BASE
    if not api_base.startswith(("http://", "https://")):
        raise MedtuneError(f"--api-base {api_base!r}: expected an http(s) URL such as {DEFAULT_API_BASE}")
    problems = []
    if not 0 < args.port < 65536:
        problems.append(f"--port {args.port}: must be between 1 and 65535")
    if args.timeout <= 0:
        problems.append(f"--timeout {args.timeout}: must be a positive number of seconds")
    if args.max_history_turns < 0:
        problems.append(f"--max-history-turns {args.max_history_turns}: must be 0 or more")
    if not 1 <= args.max_tokens <= 2048:
        problems.append(f"--max-tokens {args.max_tokens}: must be between 1 and 2048")
    votes = args.votes or default_votes_path()
    if votes.exists() and not votes.is_file():
        problems.append(f"--votes {votes}: exists and is not a file")
    if problems:
        raise MedtuneError("invalid chat settings:\n  " + "\n  ".join(problems))
    return AppConfig(
        api_base=api_base,
        api_key=_api_key(args),
        votes_path=votes,
        left_model=args.left_model,
        right_model=args.right_model,
        timeout_s=args.timeout,
        max_history_turns=args.max_history_turns,
        default_max_tokens=args.max_tokens,
    )


def run_from_args(args: argparse.Namespace) -> int:
    import logging

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    config = config_from_args(args)
    from medtune.chatbot.app import launch

    logging.getLogger(__name__).info("chat app on http://%s:%d, endpoint %s, votes to %s",
                                     args.host, args.port, config.api_base, config.votes_path)
    launch(config, host=args.host, port=args.port, block=True)
    return 0
