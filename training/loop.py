"""The per-worker training loop that Ray Train runs on every worker (`train_loop_per_worker`).

Each worker: loads the built dataset and the base model, wraps it in PEFT LoRA (or trains it
whole), hands it to DeepSpeed (`deepspeed.initialize`, ZeRO stage from the DeepSpeed config,
reusing the process group Ray Train set up: gloo on CPU, NCCL on GPU), and runs its shard of each
global batch. Rank 0 logs a line per step (loss, lr, real tokens/s, MFU), appends metrics.jsonl,
and publishes checkpoints through `medtune.training.checkpoints` (staging dir, MANIFEST last,
atomic rename, LATEST). Saving and loading DeepSpeed state are collectives, so every rank takes
part; resuming restores weights, optimizer, scheduler, RNG and the position in the epoch.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.training import checkpoints as ckpt
from medtune.training.config import TrainConfig, read_ds_config

log = logging.getLogger("medtune.train")

STATE_FILE = "trainer_state.json"
DS_STATE_DIR = "ds_state"
DS_TAG = "state"
FAULT_MARKER = ".fault_injected"


# --------------------------------------------------------------------------- DeepSpeed config


def resolve_ds_config(ds: dict, cfg: TrainConfig, world: int, hidden: int, use_gpu: bool) -> dict:
    """Fill the "auto" fields of a DeepSpeed config from the training config (as Accelerate
    and the HF Trainer do), so the seed's configs work unchanged."""
    ds = copy.deepcopy(ds)

    def fill(d: dict, key: str, value) -> None:
        if d.get(key, "auto") == "auto":
            d[key] = value

    fill(ds, "train_micro_batch_size_per_gpu", cfg.batch_size_per_device)
    fill(ds, "gradient_accumulation_steps", cfg.grad_accum)
    fill(ds, "train_batch_size", cfg.batch_size_per_device * cfg.grad_accum * world)
    fill(ds, "gradient_clipping", cfg.max_grad_norm)
    # DeepSpeed's own mixed precision runs on GPUs; on CPU we keep fp32 weights and autocast.
    for key, on in (("bf16", cfg.mx == "bf16" and use_gpu), ("fp16", cfg.mx == "fp16" and use_gpu)):
        ds.setdefault(key, {})
        fill(ds[key], "enabled", on)
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        fill(params, "lr", cfg.learning_rate)
        fill(params, "betas", [0.9, 0.999])
        fill(params, "eps", 1e-8)
        fill(params, "weight_decay", cfg.weight_decay)
        offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if not use_gpu and offload in (None, "none"):
            params["torch_adam"] = True  # FusedAdam is a CUDA kernel
    ds.pop("scheduler", None)  # the schedule is ours (warm-up + cosine), passed to initialize()
    zero = ds.setdefault("zero_optimization", {})
    fill(zero, "reduce_bucket_size", hidden * hidden)
    fill(zero, "allgather_bucket_size", hidden * hidden)
    fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
    fill(zero, "stage3_param_persistence_threshold", 10 * hidden)
    left = [path for path in _auto_paths(ds)]
    if left:
        raise MedtuneError(f"DeepSpeed config {cfg.ds_config}: cannot fill 'auto' for {', '.join(left)}")
    return ds


def _auto_paths(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _auto_paths(v, f"{prefix}{k}.")
    elif d == "auto":
        yield prefix.rstrip(".")


# --------------------------------------------------------------------------- data


def plan_sequences(
    lengths: list[int], ctx_len: int, packing: bool, seed: int, epoch: int, group: int = 0
) -> list[list[int]]:
    """The epoch's sequences as lists of example indices, in a seeded order.

    Without packing each sequence is one example. With packing, examples are shuffled and then
    placed first-fit-decreasing into bins of at most ctx_len tokens, which removes almost all
    padding; attention still spans a bin (no per-example masking), as in plain packing.

    `group` > 0 (group by length, without packing): consecutive runs of `group` sequences (one
    micro-batch across all workers) hold examples of similar length, so padding almost vanishes
    and every worker gets a similar amount of work. As in the HF Trainer's `group_by_length`,
    the shuffled examples are cut into mega-batches of 32 micro-batches, each sorted by length
    and split into micro-batches, whose order is then shuffled again (a short remainder stays at
    the end, where the loop drops it).
    """
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not packing:
        if group <= 0:
            return [[i] for i in order]
        mega = group * 32
        micros: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
            micros += [chunk[k:k + group] for k in range(0, len(chunk), group)]
        rest = micros.pop() if micros and len(micros[-1]) < group else []  # a short last one stays last
        rng.shuffle(micros)
        return [[i] for micro in [*micros, rest] for i in micro]
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(order, key=lambda i: -min(lengths[i], ctx_len)):
        n = min(lengths[i], ctx_len)
        for b, free in enumerate(room):
            if free >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(ctx_len - n)
    rng.shuffle(bins)
    return bins


def make_batch(dataset, seq_plan: list[list[int]], ctx_len: int, pad_id: int):
    from medtune.training.build import collate_batch

    feats = []
    for seq in seq_plan:
        ids: list[int] = []
        labels: list[int] = []
        for i in seq:
            ex = dataset[i]
            ids += ex["input_ids"][:ctx_len]
            labels += ex["labels"][:ctx_len]
        feats.append({"input_ids": ids[:ctx_len], "labels": labels[:ctx_len]})
    return collate_batch(feats, pad_id)


# --------------------------------------------------------------------------- the loop


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    micro: int = 0  # micro-batches done in the current epoch
    tokens: int = 0  # real (non-pad) tokens trained on so far, all ranks


def answer_loss(causal_lm, batch: dict, reduction: str = "mean"):
    """Mean cross-entropy over the answer tokens, with vocabulary logits computed only there.

    The standard forward projects every position onto the whole vocabulary (49k entries for
    SmolLM2, 32k for Llama 2) and then discards the prompt positions through label masking; on
    PubMedQA most tokens are prompt. Running the decoder body, selecting the positions whose next
    token is an answer token, and applying the output head to those alone gives the same loss and
    gradients with far less work and memory. Models with logit soft-capping use the plain path.

    A right-padded batch (every built batch) needs no attention mask: under causal attention a
    real token never sees the padding after it, and padded positions carry no loss. Leaving the
    mask out lets attention take its mask-free causal path.
    """
    import torch.nn.functional as F

    from medtune.training.build import IGNORE_INDEX

    mask = batch["attention_mask"]
    if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        mask = None  # right padding only (ones, then zeros, in every row)
    if getattr(causal_lm.config, "final_logit_softcapping", None):
        logits = causal_lm(input_ids=batch["input_ids"], attention_mask=mask).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=reduction)
    hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[keep], reduction=reduction)


@dataclass
class Window:
    """Sums over the micro-batches since the last log line (this rank's share)."""

    tokens: float = 0.0  # real (non-pad) tokens
    answers: float = 0.0  # tokens that carry loss
    loss: float = 0.0
    micros: float = 0.0
    padded_len: float = 0.0  # summed sequence length after padding

    def add(self, batch: dict, loss: float, ignore_index: int) -> None:
        self.tokens += int(batch["attention_mask"].sum())
        self.answers += int((batch["labels"] != ignore_index).sum())
        self.loss += loss
        self.micros += 1
        self.padded_len += batch["input_ids"].shape[1]


def lr_lambda(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_loop_per_worker(config: dict) -> None:  # noqa: C901 - one readable recipe
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.training import cpu_fast
    from medtune.training.build import IGNORE_INDEX, load_built
    from medtune.training.models import hf_token
    from medtune.training.monitor import NetMonitor, body_params, measure_peak_tflops, model_flops_per_token

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = TrainConfig.model_validate(config["train"])
    run_id: str = config["run_id"]
    storage = Path(config["storage"])
    rdir = ckpt.run_dir(storage, run_id)
    use_gpu: bool = config["use_gpu"]

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    local_rank = tctx.get_local_rank()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    is_main = rank == 0
    device = torch.device(f"cuda:{local_rank}" if use_gpu else "cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    # Point DeepSpeed's comm layer at the process group Ray Train already set up, before
    # anything (zero.Init under ZeRO-3) asks it for the world size.
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", dist_init_required=False)
    netmon = NetMonitor().start()

    # ---- data
    built, card = load_built(cfg.dataset_dir)
    tok = AutoTokenizer.from_pretrained(Path(cfg.dataset_dir) / "tokenizer")
    train_ds = built["train"]
    eval_ds = built["test"] if "test" in built else None
    lengths = [len(x) for x in train_ds["input_ids"]]
    group = cfg.batch_size_per_device * world if cfg.group_by_length else 0
    micro_per_epoch = len(plan_sequences(lengths, cfg.ctx_len, cfg.packing, cfg.seed, 0, group)) // (cfg.batch_size_per_device * world)
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise MedtuneError(
            f"{len(train_ds)} training examples make no full step of {cfg.batch_size_per_device} x {world} workers "
            f"x {cfg.grad_accum} accumulation; lower the batch size"
        )
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_epochs  # --max-steps overrides epochs
    epochs_needed = math.ceil(total_steps / steps_per_epoch)

    # ---- model (same seed on every rank so LoRA's random init agrees before DeepSpeed syncs it)
    torch.manual_seed(cfg.seed)
    raw_ds = read_ds_config(cfg.ds_config)
    stage = raw_ds.get("zero_optimization", {}).get("stage", 0)
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(cfg.model_name, token=hf_token()).hidden_size
    ds_cfg = resolve_ds_config(raw_ds, cfg, world, hidden, use_gpu)
    dschf = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        dschf = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 - must stay alive: makes from_pretrained partition (zero.Init)
    load_dtype = torch.bfloat16 if (use_gpu and cfg.mx == "bf16") else torch.float16 if cfg.mx == "fp16" else torch.float32
    attn = cfg.attn_implementation if cfg.attn_implementation != "auto" else ("sdpa" if use_gpu else cpu_fast.ATTENTION)
    if attn == cpu_fast.ATTENTION:
        cpu_fast.register_attention()
    model = AutoModelForCausalLM.from_pretrained(cfg.model_name, dtype=load_dtype, token=hf_token(), attn_implementation=attn)
    added_tokens = len(tok) > model.get_input_embeddings().weight.shape[0] if stage != 3 else len(tok) > model.config.vocab_size
    if added_tokens:
        model.resize_token_embeddings(len(tok))
    model.config.use_cache = False
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.lora:
            model.enable_input_require_grads()
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM",
            # New marker tokens need trainable embeddings, or the model can never learn them.
            modules_to_save=["embed_tokens", "lm_head"] if added_tokens else None,
        )
        model = get_peft_model(model, lcfg)
        if not use_gpu:  # the CPU fast path (training/cpu_fast.py); ZeRO-3 keeps weights partitioned, so not there
            from medtune.training.dropout import use_fast_lora_dropout

            use_fast_lora_dropout(model)  # for any LoRA layer the fused forward leaves to PEFT
            if stage != 3:
                if cfg.mx == "bf16":
                    frozen_linear_to_bf16(model)
                    cpu_fast.bf16_tied_head(model.get_base_model())
                cpu_fast.fuse_lora_layers(model)
    if not use_gpu and cfg.mx == "bf16":
        cpu_fast.bf16_norm_outputs(model, compile=cfg.compile)
        cpu_fast.bf16_rotary(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)
    n_total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank from here on

    optimizer = None
    if "optimizer" not in ds_cfg:
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup_ratio)),
        config=ds_cfg,
        dist_init_required=False,
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if (not use_gpu and cfg.mx == "bf16") else None
    # The causal LM inside the engine (under PEFT when LoRA): its decoder and head are called
    # directly by `answer_loss`; ZeRO-3's parameter hooks live on the modules, so they still fire.
    causal_lm = engine.module.get_base_model() if cfg.lora else engine.module
    n_body = body_params(causal_lm)
    vocab = causal_lm.config.vocab_size  # after any resize for added tokens

    # ---- resume
    pos = Position()
    resume_dir = None
    if cfg.resume == "auto":
        resume_dir = ckpt.latest_checkpoint(storage, run_id)
    elif cfg.resume != "never":
        resume_dir = Path(cfg.resume)
    if resume_dir is not None:
        if is_main:
            ckpt.verify_checkpoint(resume_dir)
        dist.barrier()
        load_path, _ = engine.load_checkpoint(
            str(resume_dir / DS_STATE_DIR), tag=DS_TAG, load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise MedtuneError(f"{resume_dir}: DeepSpeed state could not be loaded")
        state = json.loads((resume_dir / STATE_FILE).read_text())
        pos = Position(**state["position"])
        rng_file = resume_dir / "rng" / f"rank_{rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
        if is_main:
            log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", resume_dir, pos.step, pos.epoch + 1, pos.micro)

    peak = cfg.peak_tflops or measure_peak_tflops("cuda" if use_gpu else "cpu")
    peak_total = peak * world
    metrics_path = rdir / "metrics.jsonl"
    if is_main:
        rdir.mkdir(parents=True, exist_ok=True)
        log.info(
            "run %s: %d workers, ZeRO-%d, %s, %s params (%s trainable), %d steps (%d per epoch), peak %.2f TFLOP/s/worker",
            run_id, world, stage, "LoRA" if cfg.lora else "full", f"{n_total / 1e6:.1f}M", f"{n_trainable / 1e6:.2f}M",
            total_steps, steps_per_epoch, peak,
        )

    def write_metrics(record: dict) -> None:
        if is_main:
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def evaluate() -> dict:
        if eval_ds is None or len(eval_ds) == 0:
            return {}
        engine.eval()
        n = len(eval_ds)
        per_round = world * cfg.eval_batch_size_per_device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        # Every rank runs the same number of forwards (ZeRO-3 forwards are collectives).
        for r in range(math.ceil(n / per_round)):
            start = r * per_round + rank * cfg.eval_batch_size_per_device
            idx = list(range(start, min(start + cfg.eval_batch_size_per_device, n)))
            weight = 1.0 if idx else 0.0
            batch = make_batch(eval_ds, [[i] for i in (idx or [0])], cfg.ctx_len, tok.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad(), (autocast or _null()):
                tok_loss = answer_loss(causal_lm, batch, reduction="sum")
            loss_sum += weight * tok_loss.double()
            count += weight * (batch["labels"][:, 1:] != IGNORE_INDEX).sum().double()
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
        engine.train()
        loss = (loss_sum / count.clamp(min=1)).item()
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}

    def save(metrics: dict) -> None:
        nonce = [uuid.uuid4().hex[:8] if is_main else None]
        dist.broadcast_object_list(nonce, src=0)
        staging = ckpt.staging_dir(rdir, pos.step, nonce[0])
        if is_main:
            staging.mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(staging / DS_STATE_DIR), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=cfg.lora)
        (staging / "rng").mkdir(exist_ok=True)
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, staging / "rng" / f"rank_{rank}.pt")
        unwrapped = engine.module
        if cfg.lora:
            params = [p for p in unwrapped.parameters() if p.requires_grad]
            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if stage == 3 else _null()
            with ctx:
                if is_main:
                    unwrapped.save_pretrained(str(staging), safe_serialization=True)
        else:
            state_dict = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else None
            if is_main:
                unwrapped.save_pretrained(str(staging), state_dict=state_dict, safe_serialization=True)
        if is_main:
            tok.save_pretrained(str(staging))
            (staging / STATE_FILE).write_text(json.dumps({"run_id": run_id, "position": pos.__dict__}, indent=2))
        dist.barrier()
        if is_main:
            check_saved_weights(staging, cfg.lora, n_trainable if cfg.lora else n_total)
            ckpt.write_manifest(staging, {
                "run_id": run_id, "step": pos.step, "epoch": pos.epoch + (pos.micro / max(1, micro_per_epoch)),
                "base_model": str(cfg.model_name), "prompt_type": card["prompt_type"],
                "system_prompt": card.get("system_prompt"), "kind": "lora" if cfg.lora else "full",
                "metrics": metrics, "tokens": pos.tokens,
            })
            final = ckpt.publish(staging, storage, run_id, pos.step)
            removed = ckpt.prune_checkpoints(rdir, cfg.num_checkpoints_to_keep, active_nonce=None)
            write_metrics({"type": "checkpoint", "step": pos.step, "path": str(final), "pruned": [p.name for p in removed]})
            log.info("checkpoint published: %s", final)
        dist.barrier()

    # ---- train
    engine.train()
    t_log = time.perf_counter()
    window = Window()
    stopped_early = False
    last_eval: dict = {}
    loss = None
    run_start = time.perf_counter()
    while pos.step < total_steps and pos.epoch < epochs_needed and not stopped_early:
        plan = plan_sequences(lengths, cfg.ctx_len, cfg.packing, cfg.seed, pos.epoch, group)
        per_micro = cfg.batch_size_per_device * world
        while pos.micro < micro_per_epoch and pos.step < total_steps:
            start = pos.micro * per_micro + rank * cfg.batch_size_per_device
            batch = make_batch(train_ds, plan[start:start + cfg.batch_size_per_device], cfg.ctx_len, tok.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast or _null():
                loss = answer_loss(causal_lm, batch)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            pos.micro += 1
            window.add(batch, float(loss.detach()), IGNORE_INDEX)
            if not boundary:
                continue
            pos.step += 1
            if cfg.fault_at_step and pos.step == cfg.fault_at_step and rank == world - 1:
                marker = rdir / FAULT_MARKER
                if not marker.exists():
                    marker.write_text("worker killed on purpose by fault_at_step\n")
                    log.warning("fault injection: worker %d exits at step %d", rank, pos.step)
                    os._exit(1)
            if pos.step % cfg.log_every_steps == 0 or pos.step == total_steps:
                stats = torch.tensor([window.tokens, window.loss, window.micros, window.padded_len, window.answers],
                                     dtype=torch.float64, device=device)
                dist.all_reduce(stats)
                dt = time.perf_counter() - t_log
                tokens, loss_total, micros, seqs, answers = stats.tolist()
                pos.tokens += int(tokens)
                tps = tokens / dt
                fpt = model_flops_per_token(n_body, causal_lm.config.num_hidden_layers, hidden, vocab, seqs / micros,
                                            answers / max(tokens, 1), not cfg.lora)
                record = {
                    "type": "train", "step": pos.step, "epoch": round(pos.epoch + pos.micro / micro_per_epoch, 3),
                    "loss": loss_total / micros, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tps,
                    "mfu": tps * fpt / (peak_total * 1e12), "tokens": pos.tokens, "time": time.time(),
                }
                write_metrics(record)
                if is_main:
                    log.info(
                        "step %d/%d | epoch %.2f | loss %.4f | lr %.2e | %.0f tok/s | MFU %.1f%%",
                        pos.step, total_steps, record["epoch"], record["loss"], record["lr"], tps, 100 * record["mfu"],
                    )
                ray.train.report({k: v for k, v in record.items() if k != "type"})
                t_log = time.perf_counter()
                window = Window()
            if cfg.save_every_steps and pos.step % cfg.save_every_steps == 0 and pos.step < total_steps:
                save({"loss": float(loss.detach())})
        if pos.micro >= micro_per_epoch or pos.step >= total_steps:
            last_eval = evaluate()
            if last_eval:
                write_metrics({"type": "eval", "step": pos.step, "epoch": pos.epoch + 1, **last_eval})
                if is_main:
                    log.info("eval after epoch %d: loss %.4f, perplexity %.3f", pos.epoch + 1, last_eval["eval_loss"], last_eval["eval_perplexity"])
            if cfg.stop_perplexity and last_eval and last_eval["eval_perplexity"] <= cfg.stop_perplexity:
                stopped_early = True
                if is_main:
                    log.info("eval perplexity %.3f <= %.3f: stopping early", last_eval["eval_perplexity"], cfg.stop_perplexity)
            if pos.micro >= micro_per_epoch:
                pos.epoch += 1
                pos.micro = 0
            save({**({"loss": float(loss.detach())} if loss is not None else {}), **last_eval})
            t_log = time.perf_counter()

    net = netmon.summary()
    nets: list = [None] * world
    dist.all_gather_object(nets, net)
    if is_main:
        by_node = {}
        for item in nets:
            by_node.setdefault(item["node"], item)
        train_records = [json.loads(line) for line in metrics_path.read_text().splitlines() if '"type": "train"' in line]
        summary = {
            "run_id": run_id, "steps": pos.step, "epochs": pos.epoch, "stopped_early": stopped_early,
            "final_loss": train_records[-1]["loss"] if train_records else None,
            "tokens_per_s": (sum(r["tokens_per_s"] for r in train_records) / len(train_records)) if train_records else None,
            "mfu": (sum(r["mfu"] for r in train_records) / len(train_records)) if train_records else None,
            "peak_tflops_per_worker": peak, "workers": world, "lora": cfg.lora,
            # What really ran, read off the engine (not the config): proof DeepSpeed was not bypassed.
            "engine": type(engine).__name__, "zero_stage": int(engine.zero_optimization_stage()),
            "backend": dist.get_backend(),
            "trainable_params": n_trainable, "total_params": n_total, **last_eval,
            "checkpoint": str(ckpt.latest_checkpoint(storage, run_id)), "network": list(by_node.values()),
            "seconds_this_attempt": round(time.perf_counter() - run_start, 1),
        }
        from medtune.fileio import atomic_write

        with atomic_write(rdir / "summary.json") as fh:
            fh.write(json.dumps(summary, indent=2) + "\n")
    dist.barrier()


def frozen_linear_to_bf16(model) -> int:
    """Store the frozen weights of linear layers in bf16 (CPU LoRA under bf16 autocast).

    Autocast casts every fp32 linear weight to bf16 on each forward, so storing the frozen ones
    in bf16 gives bit-identical matmuls without the casts (and half the memory). Norms,
    embeddings (and an output head tied to them) and the trainable LoRA weights stay fp32.
    Returns how many weights were cast."""
    import torch

    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    cast = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and not weight.requires_grad and weight.dtype == torch.float32
                and id(weight) not in embedding_ids):
            module.weight.data = weight.data.to(torch.bfloat16)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(torch.bfloat16)
            cast += 1
    return cast


def check_saved_weights(ckpt_dir: Path, lora: bool, expected_numel: int) -> None:
    """Refuse to publish weights that are empty or short (ZeRO-3 can save near-empty tensors)."""
    from safetensors import safe_open

    files = sorted(ckpt_dir.glob("adapter_model*.safetensors" if lora else "model*.safetensors"))
    if not files:
        raise MedtuneError(f"{ckpt_dir}: no {'adapter' if lora else 'model'} weights were saved")
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                shape = sf.get_slice(name).get_shape()
                numel = math.prod(shape)
                if numel == 0:
                    raise MedtuneError(f"{f}: tensor {name} is empty (shape {shape}); not publishing this checkpoint")
                total += numel
    # Every trained element must be there; more is fine (PEFT also saves resized embeddings
    # when tokens were added to the vocabulary).
    if total < expected_numel:
        raise MedtuneError(f"{ckpt_dir}: saved {total} weight elements, expected {expected_numel}; not publishing")
    if lora:
        from peft import PeftConfig

        PeftConfig.from_pretrained(str(ckpt_dir))


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
