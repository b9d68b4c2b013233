"""`medtune train` (`make train`): fine-tune on Ray Train workers with DeepSpeed ZeRO and LoRA.

    medtune train --config training/configs/smollm2_sample.yaml            # local Ray, 2 CPU workers
    medtune train --config training/configs/llama2_7b.yaml -nd 16 -bs 8   # inside a Ray cluster

Starts (or joins) Ray, runs `medtune.training.loop.train_loop_per_worker` on `--num-devices`
workers through `TorchTrainer` (gloo on CPU, NCCL on GPU), recovers from worker failures by
resuming from the run's LATEST checkpoint, and prints a summary: steps, loss, eval perplexity,
real tokens/s, MFU and each node's network bandwidth. Checkpoints land in
<storage>/runs/<run_id>/step_NNNNNN with MANIFEST.json; <storage>/LATEST names the newest.
To submit to a remote cluster instead, use `medtune submit train ...` (or set RAY_ADDRESS=http://HEAD:8265).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.training import checkpoints as ckpt
from medtune.training.config import (
    TrainConfig,
    add_arguments as add_config_arguments,
    config_from_args,
    shipped_path,
    validate_config,
)

log = logging.getLogger("medtune.train")

# Environment passed to every worker: offline hub, quiet tokenizers, and PATH with this
# interpreter's bin/ so DeepSpeed finds ninja when it compiles its CPU communication op.
PROPAGATED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "TORCH_EXTENSIONS_DIR", "MEDTUNE_STORAGE", "HF_TOKEN", "HF_TOKEN_FILE")


def ray_runtime_env() -> dict:
    """The runtime_env for ray.init: what every worker needs from this process's environment."""
    env = {k: os.environ[k] for k in PROPAGATED_ENV if k in os.environ}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {"env_vars": env}


def resolve_run(cfg: TrainConfig) -> tuple[Path, str]:
    """Storage root and run id: the given run name, the run of a --resume PATH, or a new id."""
    storage = ckpt.storage_root(cfg.output_dir)
    if cfg.resume not in ("auto", "never"):
        resume = Path(cfg.resume).resolve()
        return storage, cfg.run_name or resume.parent.name
    if cfg.run_name:
        return storage, cfg.run_name
    return storage, f"{cfg.config_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Ray workers run in their own working directory: ship absolute paths only."""
    update = {"dataset_dir": str(Path(cfg.dataset_dir).resolve()), "ds_config": str(shipped_path(cfg.ds_config).resolve())}
    if Path(cfg.model_name).exists():
        update["model_name"] = str(Path(cfg.model_name).resolve())
    if cfg.resume not in ("auto", "never"):
        update["resume"] = str(Path(cfg.resume).resolve())
    return cfg.model_copy(update=update)


def run(cfg: TrainConfig, ray_address: str | None = None) -> dict:
    """Validate, train on Ray, and return the run summary (also in runs/<run_id>/summary.json)."""
    import torch

    gpu_here = torch.cuda.is_available()
    problems = validate_config(cfg, gpu_available=gpu_here)
    if problems:
        raise MedtuneError("cannot start training:\n  " + "\n  ".join(problems))
    cfg = absolute_paths(cfg)
    storage, run_id = resolve_run(cfg)
    storage = storage.resolve()
    rdir = ckpt.run_dir(storage, run_id)
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2) + "\n")

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from medtune.training.loop import train_loop_per_worker

    if not ray.is_initialized():
        # Inside a submitted Ray job the job's runtime_env already applies (and Ray refuses to
        # merge a second one that sets the same variables).
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=ray_address, runtime_env=None if in_job else ray_runtime_env(), log_to_driver=True)
    use_gpu = cfg.use_gpu == "true" or (cfg.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    resources = {"CPU": cfg.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(), "run_id": run_id, "storage": str(storage.resolve()), "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=cfg.num_devices, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_id,
            storage_path=str((storage / "ray_results").resolve()),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps the worker's exception; show its root cause
        raise MedtuneError(f"training run {run_id} failed: {_root_cause(err)}") from err
    if getattr(result, "error", None):
        raise MedtuneError(f"training run {run_id} failed: {_root_cause(result.error)}")
    summary_file = rdir / "summary.json"
    if not summary_file.is_file():
        raise MedtuneError(f"training run {run_id} ended without writing {summary_file}")
    summary = json.loads(summary_file.read_text())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def format_summary(s: dict) -> str:
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [
        f"run {s['run_id']}: {s['steps']} steps, {s['epochs']} epoch(s) on {s['workers']} workers "
        f"(ZeRO-{s['zero_stage']}, {'LoRA' if s['lora'] else 'full'}, {s['trainable_params'] / 1e6:.2f}M trainable)"
        + (" - stopped early on perplexity" if s.get("stopped_early") else ""),
        f"  final train loss {fmt(s.get('final_loss'), '.4f')}   eval loss {fmt(s.get('eval_loss'), '.4f')}   "
        f"eval perplexity {fmt(s.get('eval_perplexity'), '.3f')}",
        f"  throughput {fmt(s.get('tokens_per_s'), '.0f')} real tokens/s   MFU {fmt(100 * s['mfu'] if s.get('mfu') is not None else None, '.1f')}% "
        f"of {s['peak_tflops_per_worker']:.2f} TFLOP/s per worker (measured bf16 matmul)",
        f"  checkpoint {s['checkpoint']}",
        "  network (per node, loopback excluded):",
    ]
    for n in s.get("network", []):
        lines.append(
            f"    {n['node']}: rx avg {n['rx_avg_gbps']:.4f} / peak {n['rx_peak_gbps']:.4f} Gbit/s, "
            f"tx avg {n['tx_avg_gbps']:.4f} / peak {n['tx_peak_gbps']:.4f} Gbit/s over {n['seconds']} s"
        )
    if "wall_seconds" in s:
        lines.append(f"  wall time {s['wall_seconds']:.0f} s")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run_from_args(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith("http"):
        from medtune.training import submit

        return submit.submit_train(getattr(args, "train_argv", []), address=address, follow=False)
    summary = run(cfg, ray_address=address or None)
    print(format_summary(summary))
    return 0
