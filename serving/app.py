"""The Ray Serve application: one deployment holding the engine(s), with the FastAPI app as ingress.

    medtune serve                                  local Ray, 127.0.0.1:8000 (serving/cli.py)
    import path  medtune.serving.app:build_app     RayService / `serve run` on a cluster

`build_app(args)` takes the serving settings as a dict (`config` names a YAML file; any other
key overrides it), validates them before anything starts and returns the bound application.
The replica starts its engine in the background, so /health answers 503 while it loads.

Ray Serve LLM (`ray.serve.llm`) was checked first: in Ray 2.60 its dynamic LoRA loading only
reads adapters from cloud URIs (s3/gs/abfss/azure), not a shared-filesystem checkpoint, and
it has no hook points for guardrails or the storage MANIFEST check, so vLLM's AsyncLLM is
wrapped here instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from ray import serve
from ray.serve import Application

from medtune.serving.config import ServeConfig, load_config

log = logging.getLogger(__name__)

# Forwarded into the replica so it sees what the operator's shell set. Secret values
# (HF_TOKEN, MEDTUNE_API_KEY) are not: a runtime_env shows in the Ray dashboard. A local
# Ray inherits them from this process; on KubeRay they come from the pod's Secret.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_TOKEN_FILE", "MEDTUNE_STORAGE", "MEDTUNE_API_KEY_FILE",
                 "MEDTUNE_GUARD_AUDIT", "TOKENIZERS_PARALLELISM", "VLLM_CPU_OMP_THREADS_BIND")


def load_guard(spec: str):
    if spec == "none":
        from medtune.guardrails.base import NoGuard

        return NoGuard()
    from medtune.guardrails import load_guard as load

    return load(spec)


@serve.deployment(name="medtune")
@serve.ingress()
class MedtuneServer:
    def __init__(self, settings: dict) -> None:
        from medtune.logs import setup_logging
        from medtune.serving.config import api_key
        from medtune.serving.service import Service

        setup_logging(None)
        cfg = ServeConfig.model_validate(settings)
        self.service = Service(cfg, guard=load_guard(cfg.guardrails))
        self.api_key = api_key(cfg)
        self._starting = asyncio.get_event_loop().create_task(self.service.start())

    def __del__(self) -> None:
        # Serve calls this on a graceful stop; the engines go with the process, the merged copies
        # on local disk would not.
        self.service.remove_files()

    def __serve_build_asgi_app__(self):
        from medtune.serving.api import create_app

        return create_app(self.service, api_key=self.api_key)


def resolve_paths(cfg: ServeConfig) -> ServeConfig:
    """Absolute paths, taken where build_app runs: the replica's working directory may differ."""
    update = {"storage": str(cfg.storage_path().resolve())}
    if Path(cfg.base_model).expanduser().exists():
        update["base_model"] = str(Path(cfg.base_model).expanduser().resolve())
    return cfg.model_copy(update=update)


def replica_env(cfg: ServeConfig) -> dict[str, str]:
    from medtune.serving.vllm_engine import cpu_environment

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.engine == "vllm" and cfg.gpus_per_replica == 0:
        env.update({k: v for k, v in cpu_environment(cfg).items() if k not in env})
    return env


def app_from_config(cfg: ServeConfig) -> Application:
    cfg = resolve_paths(cfg)
    return MedtuneServer.options(
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica,
                           "runtime_env": {"env_vars": replica_env(cfg)}},
        # Admission (429) is the app's own; Ray's limit only has to be above it.
        max_ongoing_requests=cfg.max_concurrent + cfg.max_queue + 8,
        # The engine takes tens of seconds to load; Serve must not give up on the replica first.
        health_check_timeout_s=120,
        graceful_shutdown_timeout_s=30,
    ).bind(cfg.model_dump())


def build_app(args: dict | None = None) -> Application:
    """Serve application builder: `{"config": FILE, <setting>: value, ...}`."""
    args = dict(args or {})
    config = args.pop("config", None)
    return app_from_config(load_config(config, args))
