"""Training configuration: one pydantic model fed by a YAML file and overridden by flags.

    medtune train --config training/configs/smollm2_sample.yaml -nd 2 -bs 4 --max-steps 20

Unknown keys in YAML fail loudly (extra="forbid"). `validate_config` checks everything that
can be checked before Ray starts and raises once, listing every problem with its fix. The seed's
flag spellings (`--num-devices/-nd`, `--batch-size-per-device/-bs`, ...) keep working.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medtune.errors import MedtuneError
from medtune.fileio import read_yaml_mapping

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class TrainConfig(BaseModel):
    """Everything one training run needs; serialisable so Ray can ship it to every worker."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(description="Base model: a HF directory (e.g. from `medtune model import`) or hub id.")
    dataset_dir: str = Field(description="Built dataset directory (from `medtune data build`).")
    output_dir: str | None = Field(default=None, description="Storage root for runs/ and LATEST (default $MEDTUNE_STORAGE or ./storage).")
    run_name: str | None = Field(default=None, description="Run id under runs/ (default: <config name>-<UTC time>).")
    num_devices: int = Field(default=2, description="Ray Train workers (one per GPU, or per CPU slot).")
    use_gpu: Literal["auto", "true", "false"] = Field(default="auto", description="auto = use GPUs when the cluster has them.")
    cpus_per_worker: float = Field(default=1, description="CPU slots each worker reserves.")
    batch_size_per_device: int = Field(default=4, description="Micro-batch size per worker.")
    eval_batch_size_per_device: int = Field(default=8, description="Eval batch size per worker.")
    grad_accum: int = Field(default=1, description="Gradient accumulation steps.")
    ds_config: str = Field(default=str(CONFIG_DIR / "deepspeed" / "zero_2.json"), description="DeepSpeed JSON config; 'auto' fields are filled from this config.")
    num_epochs: int = Field(default=1, description="Passes over the train split.")
    max_steps: int | None = Field(default=None, description="Stop after this many optimizer steps (overrides epochs).")
    ctx_len: int = Field(default=512, description="Max tokens per sequence (longer built examples are cut).")
    mx: Literal["no", "fp16", "bf16"] = Field(default="bf16", description="Mixed precision: bf16 on GPU (DeepSpeed bf16) or bf16 autocast on CPU; fp16 needs a GPU.")
    learning_rate: float = Field(default=2e-4, description="Peak learning rate.")
    warmup_ratio: float = Field(default=0.05, description="Fraction of steps with linear warm-up, then cosine decay.")
    weight_decay: float = Field(default=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, description="Gradient clipping norm.")
    stop_perplexity: float | None = Field(default=None, description="Stop once eval perplexity is at or below this.")
    num_checkpoints_to_keep: int = Field(default=2, description="Published checkpoints kept per run (never the LATEST one).")
    save_every_steps: int | None = Field(default=None, description="Also checkpoint every N steps (always at each epoch end).")
    lora: bool = Field(default=True, description="LoRA adapters (default) or full fine-tuning.")
    lora_r: int = Field(default=16, description="LoRA rank.")
    lora_alpha: int = Field(default=32, description="LoRA alpha.")
    lora_dropout: float = Field(default=0.05, description="LoRA dropout.")
    lora_target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), description="Module names LoRA wraps.")
    packing: bool = Field(default=False, description="Pack several short examples into each sequence (less padding).")
    group_by_length: bool = Field(
        default=False,
        description="Batch examples of similar length together (little padding, no cross-example attention); the batches' order stays random.",
    )
    attn_implementation: Literal["auto", "medtune_cpu", "eager", "sdpa", "flash_attention_2"] = Field(
        default="auto", description="Attention kernel: auto = medtune_cpu on CPU (the fast path's grouped-query attention), sdpa on GPU.",
    )
    compile: bool = Field(
        default=True,
        description="On the CPU bf16 fast path, torch.compile the RMSNorms (falls back to eager if compiling fails); --no-compile skips it.",
    )
    grad_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    resume: str = Field(default="auto", description="auto = continue this run from its LATEST; never; or a checkpoint path.")
    seed: int = Field(default=42, description="Seed for init, shuffling and dropout.")
    log_every_steps: int = Field(default=1, description="Log and report metrics every N steps.")
    max_failures: int = Field(default=1, description="Worker failures Ray Train recovers from (resuming from the last checkpoint).")
    peak_tflops: float | None = Field(default=None, description="Hardware peak for MFU; measured with a bf16 matmul when unset.")
    fault_at_step: int | None = Field(default=None, description="Testing only: worker 1 exits at this step on the first attempt.")
    config_name: str = Field(default="medtune", description="Name of the YAML this came from (used in the default run id).")


# Flag name -> (aliases, type, help): the seed's spellings first.
FLAGS: dict[str, tuple[tuple[str, ...], type | None]] = {
    "model_name": (("--model-name", "--model_name", "-mn"), str),
    "dataset_dir": (("--dataset-dir", "--dataset_dir", "--data"), str),
    "output_dir": (("--output-dir", "--output_dir"), str),
    "run_name": (("--run-name", "--run_name"), str),
    "num_devices": (("--num-devices", "--num_devices", "-nd"), int),
    "use_gpu": (("--use-gpu",), str),
    "batch_size_per_device": (("--batch-size-per-device", "--batch_size_per_device", "-bs"), int),
    "eval_batch_size_per_device": (("--eval-batch-size-per-device", "--eval_batch_size_per_device", "-ebs"), int),
    "grad_accum": (("--grad-accum", "--grad_accum", "-ga"), int),
    "ds_config": (("--ds-config", "--ds_config", "-dc"), str),
    "num_epochs": (("--num-epochs", "--num_epochs", "-ne"), int),
    "max_steps": (("--max-steps", "--max_steps"), int),
    "ctx_len": (("--ctx-len", "--ctx_len"), int),
    "mx": (("--mx",), str),
    "learning_rate": (("--learning-rate", "--learning_rate", "--lr", "-lr"), float),
    "stop_perplexity": (("--stop-perplexity", "--stop_perplexity"), float),
    "num_checkpoints_to_keep": (("--num-checkpoints-to-keep", "--num_checkpoints_to_keep"), int),
    "save_every_steps": (("--save-every-steps", "--save_every_steps"), int),
    "lora_r": (("--lora-r",), int),
    "lora_alpha": (("--lora-alpha",), int),
    "lora_dropout": (("--lora-dropout",), float),
    "resume": (("--resume",), str),
    "seed": (("--seed",), int),
    "max_failures": (("--max-failures",), int),
    "attn_implementation": (("--attn-implementation",), str),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config (flags override it)")
    for name, (aliases, typ) in FLAGS.items():
        desc = TrainConfig.model_fields[name].description
        kwargs: dict = {"dest": name, "default": None, "help": desc}
        if name == "mx":
            kwargs["choices"] = ["no", "fp16", "bf16"]
        if name == "use_gpu":
            kwargs["choices"] = ["auto", "true", "false"]
        if name == "attn_implementation":
            kwargs["choices"] = ["auto", "medtune_cpu", "eager", "sdpa", "flash_attention_2"]
        parser.add_argument(*aliases, type=typ, **kwargs)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_const", const=True, default=None, help="LoRA adapters (default)")
    mode.add_argument("--full", dest="lora", action="store_const", const=False, help="full fine-tuning")
    parser.add_argument("--lora-target-modules", dest="lora_target_modules", default=None,
                        help="comma-separated module names for LoRA (default: all attention and MLP projections)")
    parser.add_argument("--packing", dest="packing", action="store_const", const=True, default=None,
                        help=TrainConfig.model_fields["packing"].description)
    parser.add_argument("--group-by-length", dest="group_by_length", action="store_const", const=True, default=None,
                        help=TrainConfig.model_fields["group_by_length"].description)
    parser.add_argument("--no-compile", dest="compile", action="store_const", const=False, default=None,
                        help=TrainConfig.model_fields["compile"].description)
    parser.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_const", const=True, default=None,
                        help=TrainConfig.model_fields["grad_checkpointing"].description)


def load_yaml(path: str | Path) -> dict:
    path = shipped_path(path)
    data = read_yaml_mapping(path, "training config", f"--config takes a YAML file; the shipped ones are in {CONFIG_DIR}")
    data.setdefault("config_name", path.stem)
    return data


def build_config(values: dict, where: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        lines = []
        for item in err.errors():
            field = ".".join(str(p) for p in item["loc"])
            if item["type"] == "extra_forbidden":
                lines.append(f"unknown setting '{field}' (check the spelling; see `medtune train --help`)")
            elif item["type"] == "missing":
                lines.append(f"'{field}' is required")
            else:
                lines.append(f"'{field}' = {item.get('input')!r}: {item['msg']}")
        raise MedtuneError(f"invalid {where}:\n  " + "\n  ".join(lines)) from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_yaml(args.config) if args.config else {}
    for name in [*FLAGS, "lora", "packing", "group_by_length", "grad_checkpointing", "compile", "lora_target_modules"]:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "lora_target_modules":
            value = [v.strip() for v in value.split(",") if v.strip()]
        values[name] = value
    return build_config(values, where=f"settings ({args.config or 'flags'})")


def shipped_path(path: str | Path) -> Path:
    """A path as given, or, when it does not exist, the same file among the shipped configs
    (so `training/configs/...` works from any directory and from an installed package)."""
    path = Path(path)
    if path.exists():
        return path
    parts = path.parts
    if "configs" in parts:
        candidate = CONFIG_DIR.joinpath(*parts[parts.index("configs") + 1:])
        if candidate.exists():
            return candidate
    return path


def read_ds_config(path: str | Path) -> dict:
    path = shipped_path(path)
    if not path.is_file():
        raise MedtuneError(f"--ds-config {path}: file not found (shipped ones are in {CONFIG_DIR / 'deepspeed'})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MedtuneError(f"--ds-config {path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None


def validate_config(cfg: TrainConfig, gpu_available: bool | None = None) -> list[str]:
    """Every problem found before Ray starts, each with the value and a fix; [] when fine."""
    problems: list[str] = []
    for name in ("num_devices", "batch_size_per_device", "eval_batch_size_per_device", "grad_accum", "num_epochs", "log_every_steps"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} = {getattr(cfg, name)}: must be at least 1")
    for name in ("max_steps", "save_every_steps"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            problems.append(f"{name} = {value}: must be at least 1 (or unset)")
    if cfg.num_checkpoints_to_keep < 1:
        problems.append(f"num_checkpoints_to_keep = {cfg.num_checkpoints_to_keep}: keep at least 1")
    if not 0 < cfg.learning_rate < 1:
        problems.append(f"learning_rate = {cfg.learning_rate}: expected a small positive number such as 2e-4")
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"warmup_ratio = {cfg.warmup_ratio}: must be in [0, 1)")
    if cfg.ctx_len < 32:
        problems.append(f"ctx_len = {cfg.ctx_len}: use at least 32")
    if cfg.stop_perplexity is not None and cfg.stop_perplexity <= 1:
        problems.append(f"stop_perplexity = {cfg.stop_perplexity}: perplexity is always > 1; use e.g. 3.5")
    if cfg.lora and (cfg.lora_r < 1 or cfg.lora_alpha < 1 or not 0 <= cfg.lora_dropout < 1 or not cfg.lora_target_modules):
        problems.append(
            f"LoRA settings r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout}, "
            f"targets={cfg.lora_target_modules}: need r >= 1, alpha >= 1, 0 <= dropout < 1 and at least one target"
        )
    if cfg.packing and cfg.group_by_length:
        problems.append("packing and group_by_length are two ways to cut padding: choose one")
    if gpu_available is None:
        gpu_available = _cuda_available()
    wants_gpu = cfg.use_gpu == "true" or (cfg.use_gpu == "auto" and gpu_available)
    if cfg.attn_implementation == "flash_attention_2" and not wants_gpu:
        problems.append("attn_implementation = flash_attention_2 needs a GPU; use auto, eager or sdpa on CPU")
    if cfg.mx == "fp16" and not wants_gpu:
        problems.append("mx = fp16 needs a GPU; on CPU use --mx bf16 (autocast) or --mx no")
    if cfg.use_gpu == "true" and not gpu_available and not os.environ.get("RAY_ADDRESS"):
        problems.append("use_gpu = true but this machine has no CUDA GPU; use --use-gpu auto")
    # Files.
    card = Path(cfg.dataset_dir) / "card.json"
    if not card.is_file():
        problems.append(f"dataset_dir = {cfg.dataset_dir}: not a built dataset (no card.json); run `medtune data build`")
    model = Path(cfg.model_name)
    looks_local = model.exists() or cfg.model_name.startswith((".", "/")) or cfg.model_name.count("/") != 1
    if looks_local and not (model / "config.json").is_file():
        problems.append(f"model_name = {cfg.model_name}: no config.json there; import one with `medtune model import`")
    try:
        ds = read_ds_config(cfg.ds_config)
        stage = ds.get("zero_optimization", {}).get("stage")
        if stage not in (0, 1, 2, 3):
            problems.append(f"ds_config = {cfg.ds_config}: zero_optimization.stage is {stage!r}; expected 0-3")
    except MedtuneError as err:
        problems.append(str(err))
    if cfg.resume not in ("auto", "never") and not (Path(cfg.resume) / "MANIFEST.json").is_file():
        problems.append(f"resume = {cfg.resume}: not a published checkpoint (no MANIFEST.json); use auto, never or a step_* directory")
    if cfg.run_name is not None:
        from medtune.training.checkpoints import CheckpointError, run_dir

        try:
            run_dir(Path("."), cfg.run_name)
        except CheckpointError as err:
            problems.append(str(err))
    return problems


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False
