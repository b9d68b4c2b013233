"""What is served: `base`, `finetuned` (the latest verified checkpoint) and `<run_id>/step_N`.

The Service owns the engines, the tokenizers (each served model renders prompts with its own
chat template: the base model's for `base`, the checkpoint's training template for the
fine-tune), and a watcher that polls storage LATEST. On a new checkpoint it verifies
MANIFEST.json (sizes, sha256), loads the adapter under a new name, then points `finetuned`
at it; requests already running keep their old model object and finish on it; the old
adapter is removed once its last request is done. A checkpoint that fails any check is
refused with a logged reason (once per checkpoint) and the previous one keeps serving.

A LoRA fine-tune is served one of two ways (`lora_mode`, auto by device):
  adapter  one engine, base weights shared, the adapter applied per request (multi-LoRA on GPU);
           the engine's max_lora_rank is sized to the adapter in storage at start
  merged   the adapter merged into a copy of the base, in an engine of its own (CPU: vLLM's
           LoRA path runs at a third of the base's speed, the merged copy at the base's); a new
           checkpoint is merged and started beside the old, then swapped in the same way
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from medtune.serving import merge
from medtune.serving.config import ServeConfig, lora_rank_for, resolved_lora_mode
from medtune.serving.engine import Adapter, Engine, EngineError, make_engine

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One model id's weights, tokenizer and bookkeeping; immutable once published."""

    id: str
    engine: Engine
    tokenizer: object
    adapter: Adapter | None = None
    checkpoint: str | None = None  # "<run_id>/step_N"
    manifest: dict = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    owns_engine: bool = False  # a full or merged fine-tune has an engine of its own
    workdir: str | None = None  # merged mode: the merged copy, removed with the model
    mode: str = "base"  # base | adapter | merged | full
    inflight: int = 0
    retired: bool = False

    def info(self, kind: str) -> dict:
        m = self.manifest
        return {
            "kind": kind,
            "checkpoint": self.checkpoint,
            "run_id": m.get("run_id"),
            "step": m.get("step"),
            "created": self.created,
            "base_model": m.get("base_model"),
            "prompt_type": m.get("prompt_type"),
            "finetune": m.get("kind"),
            "serving": self.mode,
        }


class ModelNotFound(LookupError):
    pass


class Service:
    def __init__(self, cfg: ServeConfig, guard=None) -> None:
        self.cfg = cfg
        self.storage = cfg.storage_path()
        self.guard = guard
        self.base: ServedModel | None = None
        self.finetuned: ServedModel | None = None
        self.ready = False
        self.error: str | None = None
        self._ids = itertools.count(1)
        self._refused: dict[str, str] = {}  # checkpoint dir -> reason, logged once
        self._swap = asyncio.Lock()
        self._watcher: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._count_lock = threading.Lock()
        from medtune.serving.metrics import Metrics

        self.metrics = Metrics()
        self.lora_mode = resolved_lora_mode(cfg)
        self.lora_rank: int | None = None  # adapter mode: the engine's max_lora_rank

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, self.cfg.base_model)
            adapters = self.cfg.serve_finetuned and self.lora_mode == "adapter"
            if adapters:
                self.lora_rank = self._engine_lora_rank()
            engine = make_engine(self.cfg.engine, self.cfg.base_model, self.cfg, enable_lora=adapters, max_lora_rank=self.lora_rank)
            await engine.start()
            base_created = int(Path(self.cfg.base_model, "config.json").stat().st_mtime) if Path(self.cfg.base_model).is_dir() else int(time.time())
            self.base = ServedModel("base", engine, tokenizer, created=base_created, owns_engine=True,
                                    manifest={"base_model": str(self.cfg.base_model)})
            if self.guard is not None and hasattr(self.guard, "warmup"):
                await asyncio.to_thread(self.guard.warmup)
            if self.cfg.serve_finetuned:
                await self.poll_once()
                self._watcher = asyncio.create_task(self._watch(), name="medtune-checkpoint-watcher")
            self.ready = True
            log.info("serving ready: base=%s finetuned=%s (lora_mode %s%s)", self.cfg.base_model,
                     self.finetuned.checkpoint if self.finetuned else None, self.lora_mode,
                     f", max_lora_rank {self.lora_rank}" if self.lora_rank else "")
        except Exception as err:
            self.error = f"{type(err).__name__}: {err}"
            log.exception("serving failed to start")
            raise

    async def shutdown(self) -> None:
        if self._watcher:
            self._watcher.cancel()
        for model in (self.finetuned, self.base):
            if model is not None and model.owns_engine:
                await model.engine.shutdown()
        self.remove_files()

    def remove_files(self) -> None:
        """Remove the merged copies this service wrote (safe to call more than once)."""
        for model in (self.finetuned, self.base):
            if model is not None:
                merge.remove(model.workdir)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.watch_interval_s)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad poll
                log.exception("checkpoint watcher: poll failed; will retry")

    # ---- lookup ----------------------------------------------------------------------------
    def models(self) -> list[tuple[str, ServedModel, str]]:
        """(id, model, kind) for everything listed in /v1/models."""
        out = []
        if self.base is not None:
            out.append(("base", self.base, "base"))
        if self.finetuned is not None:
            out.append(("finetuned", self.finetuned, "finetuned"))
            out.append((self.finetuned.checkpoint, self.finetuned, "checkpoint"))
        return out

    def resolve(self, model_id: str) -> ServedModel:
        for name, model, _ in self.models():
            if name == model_id:
                return model
        raise ModelNotFound(model_id)

    def resolve_and_acquire(self, model_id: str) -> ServedModel:
        """The model behind model_id, held until `release` (no swap can unload it in between)."""
        with self._count_lock:
            model = self.resolve(model_id)
            model.inflight += 1
            return model

    def release(self, model: ServedModel) -> None:
        with self._count_lock:
            model.inflight -= 1
            idle = model.retired and model.inflight == 0
        if idle:
            task = asyncio.get_running_loop().create_task(self._unload(model))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # ---- hot reload --------------------------------------------------------------------------
    async def poll_once(self) -> bool:
        """Load the checkpoint storage LATEST names if it is new and valid; True if switched."""
        from medtune.training.checkpoints import CheckpointError, latest_checkpoint

        try:
            ckpt = latest_checkpoint(self.storage)
        except CheckpointError as err:
            self._refuse(str(self.storage / "LATEST"), str(err))
            return False
        if ckpt is None:
            return False
        key = str(ckpt.resolve())
        current = self.finetuned.manifest.get("_dir") if self.finetuned else None
        if key == current or key in self._refused:
            return False
        async with self._swap:
            try:
                model = await self._load_checkpoint(ckpt)
            except (CheckpointError, EngineError, OSError, ValueError, RuntimeError, MemoryError) as err:
                self._refuse(key, str(err))
                return False
            with self._count_lock:
                old, self.finetuned = self.finetuned, model
            log.info("finetuned -> %s (step %s)", model.checkpoint, model.manifest.get("step"))
            self.metrics.reloads.labels("loaded").inc()
            self.metrics.serving(model.checkpoint, model.mode)
            if old is not None:
                with self._count_lock:
                    old.retired = True
                    idle = old.inflight == 0
                if idle:
                    await self._unload(old)
        return True

    def _refuse(self, key: str, reason: str) -> None:
        if self._refused.get(key) != reason:
            self.metrics.reloads.labels("refused").inc()
            log.warning("refusing checkpoint %s: %s; still serving %s", key, reason,
                        self.finetuned.checkpoint if self.finetuned else "base only")
        self._refused[key] = reason

    async def _load_checkpoint(self, ckpt: Path) -> ServedModel:
        from medtune.training.checkpoints import CheckpointError, verify_checkpoint

        manifest = await asyncio.to_thread(verify_checkpoint, ckpt)  # sizes and sha256 of every file
        manifest = dict(manifest, _dir=str(ckpt.resolve()))
        name = f"{manifest['run_id']}/step_{manifest['step']}"
        tokenizer = await asyncio.to_thread(load_tokenizer, str(ckpt))
        if getattr(tokenizer, "chat_template", None) is None:
            raise CheckpointError(f"{ckpt}: the saved tokenizer has no chat template")
        self._check_base(ckpt, manifest, tokenizer)
        created = _created(manifest)
        if manifest.get("kind") == "full":
            engine = await self._start_engine(str(ckpt), name)
            return ServedModel("finetuned", engine, tokenizer, checkpoint=name, manifest=manifest, created=created,
                               owns_engine=True, mode="full")
        if self.lora_mode == "merged":
            workdir = merge.workdir(self.cfg.merge_dir)
            try:
                try:
                    merged = await asyncio.to_thread(merge.merge_lora, self.cfg.base_model, ckpt, Path(workdir, "model"), self.cfg.dtype)
                except Exception as err:  # noqa: BLE001 - peft/transformers raise many kinds for a bad adapter
                    raise CheckpointError(f"{ckpt}: cannot merge the adapter into {self.cfg.base_model}: {err}") from None
                engine = await self._start_engine(str(merged), name)
            except BaseException:
                merge.remove(workdir)
                raise
            return ServedModel("finetuned", engine, tokenizer, checkpoint=name, manifest=manifest, created=created,
                               owns_engine=True, workdir=workdir, mode="merged")
        rank = _adapter_rank(ckpt)
        if self.lora_rank is not None and rank is not None and rank > self.lora_rank:
            raise CheckpointError(f"{ckpt}: adapter rank {rank} is over the engine's max_lora_rank {self.lora_rank} "
                                  f"(sized at start); set max_lora_rank: {lora_rank_for(rank)} and restart, or lora_mode: merged")
        adapter = Adapter(name=name, int_id=next(self._ids), path=str(ckpt))
        await self.base.engine.add_adapter(adapter)
        return ServedModel("finetuned", self.base.engine, tokenizer, adapter=adapter, checkpoint=name, manifest=manifest,
                           created=created, mode="adapter")

    async def _start_engine(self, path: str, name: str) -> Engine:
        """An engine of its own for a full or merged fine-tune; any failure to start (out of memory included) is an EngineError."""
        engine = make_engine(self.cfg.engine, path, self.cfg, enable_lora=False)
        try:
            await engine.start()
            await _warm_up(engine, name)  # the first request after a swap must not pay the engine's first step
        except Exception as err:  # noqa: BLE001
            with contextlib.suppress(Exception):
                await engine.shutdown()
            raise EngineError(f"cannot start an engine for {name}: {type(err).__name__}: {err}") from None
        return engine

    def _engine_lora_rank(self) -> int:
        """max_lora_rank for the engine: the setting, or (auto) the smallest that holds the adapter in storage now."""
        if isinstance(self.cfg.max_lora_rank, int):
            return self.cfg.max_lora_rank
        from medtune.training.checkpoints import CheckpointError, latest_checkpoint

        try:
            ckpt = latest_checkpoint(self.storage)
        except CheckpointError:
            ckpt = None
        rank = _adapter_rank(ckpt) if ckpt is not None else None
        return lora_rank_for(rank) if rank else 16

    def _check_base(self, ckpt: Path, manifest: dict, tokenizer) -> None:
        """A LoRA adapter only makes sense on the base it was trained from."""
        from medtune.training.checkpoints import CheckpointError

        if manifest.get("kind") == "full":
            return
        trained_on = manifest.get("base_model")
        if trained_on and not _same_model(trained_on, self.cfg.base_model):
            if Path(trained_on, "config.json").is_file():
                raise CheckpointError(f"{ckpt}: adapter was trained on {trained_on}, a different model from this "
                                      f"service's base {self.cfg.base_model}")
            log.warning("%s: trained on %s, which this machine cannot see; assuming it is %s",
                        ckpt, trained_on, self.cfg.base_model)
        from medtune.serving.engine import model_vocab_size

        vocab = model_vocab_size(self.cfg.base_model)
        if vocab is not None and len(tokenizer) > vocab:
            raise CheckpointError(
                f"{ckpt}: its tokenizer adds {len(tokenizer) - vocab} tokens to the base vocabulary "
                "(prompt types 2/3); a LoRA adapter cannot carry new embeddings here: train with "
                "--prompt-type chat or 1, or --full")

    async def _unload(self, model: ServedModel) -> None:
        try:
            if model.owns_engine:
                await model.engine.shutdown()
            elif model.adapter is not None:
                await model.engine.remove_adapter(model.adapter)
        except Exception:  # noqa: BLE001
            log.exception("unloading %s", model.checkpoint)
        finally:
            merge.remove(model.workdir)


async def _warm_up(engine: Engine, name: str) -> None:
    from medtune.serving.engine import GenRequest

    request = GenRequest(request_id=f"warmup-{name}-{time.monotonic_ns()}", prompt_ids=[0, 1, 2, 3], max_tokens=2, temperature=0)
    async with contextlib.aclosing(engine.generate(request)) as stream:
        async for _ in stream:
            pass


def _adapter_rank(ckpt: Path) -> int | None:
    """The largest rank in a PEFT adapter_config.json (r and any per-module rank_pattern), None if unreadable."""
    try:
        config = json.loads((Path(ckpt) / "adapter_config.json").read_text(encoding="utf-8"))
        ranks = [int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return max(ranks)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _created(manifest: dict) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(manifest.get("created"))).timestamp())
    except ValueError:
        return int(time.time())


def _same_model(a: str, b: str) -> bool:
    """Same path, or two directories holding the same architecture config."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists() and pa.resolve() == pb.resolve():
        return True
    if a == b:
        return True
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "intermediate_size")
    try:
        ca = json.loads((pa / "config.json").read_text())
        cb = json.loads((pb / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return all(ca.get(k) == cb.get(k) for k in keys)
