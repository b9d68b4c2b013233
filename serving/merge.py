"""A LoRA checkpoint merged into a copy of its base: one more plain model directory.

On CPU, vLLM's LoRA path (punica kernels written for GPUs, every adapter padded to
max_lora_rank) runs the fine-tune at a third to a half of the base's speed; the same weights
merged (W + B·A·alpha/r) run at the base's speed in an engine of their own. The copy is
derived data: written to a local directory the service owns and removes when it retires it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

_DTYPES = ("bfloat16", "float16", "float32")


def merge_lora(base_model: str | Path, checkpoint: str | Path, out_dir: str | Path, dtype: str = "auto") -> Path:
    """Write base + the adapter in `checkpoint` to `out_dir` (weights, config, the checkpoint's tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)  # merge in full precision
    saved_dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None) or torch.float32
    if dtype in _DTYPES:
        saved_dtype = getattr(torch, dtype)
    model = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
    model.to(saved_dtype if isinstance(saved_dtype, torch.dtype) else getattr(torch, str(saved_dtype)))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(str(checkpoint)).save_pretrained(out_dir)
    log.info("merged %s into a copy of %s in %.1f s", checkpoint, base_model, time.perf_counter() - start)
    return out_dir


PREFIX = "medtune-merged-"


def workdir(parent: str | None) -> str:
    """A new directory for one merged copy, named with this process id; copies left by dead
    processes (a killed replica) in the same parent are removed first."""
    root = Path(parent or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(PREFIX + "*"):
        pid = stale.name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by process %s", stale, pid)
            remove(stale)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: str | Path | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
