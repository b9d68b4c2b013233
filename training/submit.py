"""`medtune submit train ...` (`make train` with RAY_ADDRESS=http://...): run training on a cluster.

    medtune submit train --address http://HEAD:8265 --config training/configs/llama2_7b.yaml -nd 16 --follow
    RAY_ADDRESS=http://HEAD:8265 make train

Submits `medtune train <the same flags>` as a Ray job through Ray's `JobSubmissionClient` (the
KubeRay head's dashboard port; NodePort 30265 in deploy/). The flags are checked here first so a
typo fails before anything is submitted. Secrets never go into the entrypoint (it shows in
`ray job list` and the dashboard): HF_TOKEN (or the file named by HF_TOKEN_FILE) travels in the
job's runtime_env as an environment variable. On a cluster with Ray token authentication, export
RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH); RAY_AUTH_MODE=token is then set for this client when
missing. Prints the submission id and the command to follow its logs; `--follow` streams them
here and exits with the job's status.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time

from medtune.errors import MedtuneError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
SECRET_ENV = ("HF_TOKEN",)
RAY_TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # the two ways Ray's client takes a token

log = logging.getLogger("medtune.submit")


def ray_client_auth(environ: dict | None = None) -> str | None:
    """Set RAY_AUTH_MODE=token when a Ray token is given (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)
    and RAY_AUTH_MODE is not; returns the variable that gave the token, or None if nothing changed.

    Without RAY_AUTH_MODE=token, Ray's JobSubmissionClient sends no token and a cluster with token
    auth answers 401. Ray reads the mode once, when `ray` is first imported, so this must run first.
    """
    environ = os.environ if environ is None else environ
    given = next((name for name in RAY_TOKEN_ENV if environ.get(name)), None)
    if given is None or environ.get("RAY_AUTH_MODE"):
        return None
    if "ray._raylet" in sys.modules:
        raise MedtuneError(f"{given} is set but RAY_AUTH_MODE is not, and Ray is already imported in this process: "
                           "export RAY_AUTH_MODE=token before starting it")
    environ["RAY_AUTH_MODE"] = "token"
    log.info("%s is set: using RAY_AUTH_MODE=token for the Ray client", given)
    return given


def job_env() -> dict[str, str]:
    """Environment variables the job needs from here: the hub token (never via argv)."""
    from medtune.training.models import hf_token

    env: dict[str, str] = {}
    token = hf_token()
    if token:
        env["HF_TOKEN"] = token
    return env


def build_submission(train_argv: list[str], working_dir: str | None = None) -> tuple[str, dict]:
    """The entrypoint string and runtime_env for a training job; validates the flags first."""
    from medtune.training.config import add_arguments, config_from_args, shipped_path

    parser = argparse.ArgumentParser(prog="medtune train", add_help=False)
    add_arguments(parser)
    try:
        args = parser.parse_args(train_argv)
    except SystemExit:
        raise MedtuneError(f"invalid train flags: {shlex.join(train_argv)} (see `medtune train --help`)") from None
    env = job_env()
    entrypoint = shlex.join(["medtune", "train", *train_argv])
    for name, value in env.items():
        if name in SECRET_ENV and value and value in entrypoint:
            raise MedtuneError(f"the {name} value appears in the train flags; pass it only through the environment")
    # Check the settings (the YAML when this machine has a copy, merged with the flags); the
    # paths in them are the cluster's, so files are not looked up here.
    if args.config is None or shipped_path(args.config).is_file():
        config_from_args(args)
    runtime_env: dict = {"env_vars": env}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    return entrypoint, runtime_env


def submit_train(train_argv: list[str], address: str, follow: bool = False, working_dir: str | None = None) -> int:
    entrypoint, runtime_env = build_submission(train_argv, working_dir)
    ray_client_auth()
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as err:
        raise MedtuneError(f"cannot reach the Ray cluster at {address}: {err} (is the dashboard port open?)") from None
    submission_id = f"medtune-train-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    job_id = client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id, metadata={"medtune": "train"}
    )
    print(f"submitted {job_id} to {address}\n  entrypoint: {entrypoint}")
    print(f"  follow its logs with: ray job logs --address {address} {job_id} --follow")
    if not follow:
        return 0
    return follow_job(client, job_id)


def follow_job(client, job_id: str) -> int:
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    status = str(client.get_job_status(job_id)).split(".")[-1]
    while status not in TERMINAL:
        time.sleep(1)
        status = str(client.get_job_status(job_id)).split(".")[-1]
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=["train"], help="what to submit")
    parser.add_argument("--address", default=None, help="Ray dashboard address, e.g. http://HEAD:8265 (default $RAY_ADDRESS)")
    parser.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its status")
    parser.add_argument("--working-dir", default=None, help="ship this directory as the job's working_dir (code not in the image)")


def run_from_args(args: argparse.Namespace, rest: list[str]) -> int:
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise MedtuneError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    return submit_train(rest, address, follow=args.follow, working_dir=args.working_dir)
