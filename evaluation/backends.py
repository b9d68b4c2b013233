"""Where answers come from: the OpenAI-compatible endpoint (`HttpBackend`), or the same models
loaded in this process with transformers + PEFT (`LocalBackend`, `--api-base inprocess`).

Both give, per model and item, the log-probability of each decision (likelihood mode) and a
greedy answer (generate mode), for the same chat messages.

- HTTP likelihood, exact (servers with vLLM's `/tokenize` and `logprob_token_ids`: medtune
  serve, vLLM): the decision words are tokenized by the served model once; one
  `/v1/chat/completions` request per item (`max_tokens=1`, `logprob_token_ids` = the variants'
  first tokens) gives each first token's log-probability over the whole vocabulary; a variant
  of several tokens adds one request that continues the answer with its first tokens
  (`continue_final_message`, `prompt_logprobs`). The same sum as in-process, nothing unscored.
- HTTP likelihood, fallback (other OpenAI-compatible servers): `top_logprobs=20`; each decision
  scores the probability of its first token among the returned top 20 (case and leading-space
  variants summed). A decision outside the top 20 scores -inf; an item where none of the three
  appears is unscored (counted, and wrong).
- In-process likelihood: the full log-likelihood of each decision word as the continuation of
  the generation prompt (as lm-evaluation-harness scores multiple choice), summed over the same
  case and leading-space variants. No top-k cut-off, so nothing is unscored, and no network.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from medtune.errors import MedtuneError
from medtune.evaluation.scoring import LABELS, option_logprobs_from_top, option_variants

log = logging.getLogger("medtune.eval")

INPROCESS = "inprocess"
API_KEY_ENV = "MEDTUNE_API_KEY"
TOP_LOGPROBS = 20


@dataclass
class Likelihood:
    """Per-decision log-probabilities, or None with the reason the item could not be scored."""

    logprobs: dict[str, float] | None
    note: str | None = None


@dataclass
class Generation:
    text: str
    finish_reason: str | None = None
    note: str | None = None  # "blocked" (guardrail), "error: ..." (the request failed)


@dataclass
class ModelInfo:
    """What a model id resolved to, for the report."""

    id: str
    kind: str  # base | finetuned | checkpoint
    checkpoint: str | None = None  # "<run_id>/step_N"
    run_id: str | None = None
    step: int | None = None
    base_model: str | None = None
    prompt_type: str | None = None
    path: str | None = None  # in-process: the checkpoint directory
    extra: dict = field(default_factory=dict)


def normalise_api_base(url: str) -> str:
    """`http://host:8000` and `http://host:8000/` mean `http://host:8000/v1`."""
    url = url.strip().rstrip("/")
    scheme_rest = url.split("://", 1)
    if len(scheme_rest) == 2 and "/" not in scheme_rest[1]:
        url += "/v1"
    return url


# --- over HTTP ----------------------------------------------------------------------------------

class HttpBackend:
    """The `openai` client against a medtune (or any OpenAI-compatible) endpoint."""

    kind = "http"

    def __init__(self, api_base: str, timeout: float = 120.0, max_retries: int = 2, concurrency: int = 4):
        from openai import OpenAI

        self.api_base = normalise_api_base(api_base)
        # The key comes from the environment only (argv is visible in `ps`); servers without
        # MEDTUNE_API_KEY accept any value.
        key = os.environ.get(API_KEY_ENV) or "none"
        self.client = OpenAI(base_url=self.api_base, api_key=key, timeout=timeout, max_retries=max_retries)
        self.concurrency = max(1, concurrency)
        self._key = key
        self._timeout = timeout
        self._variants: dict[str, dict[str, list[tuple[list[int], list[str]]]] | None] = {}
        self._variants_lock = threading.Lock()
        self.method = {"likelihood": self.EXACT, "generate": "HTTP /v1/chat/completions, temperature=0"}

    EXACT = ("HTTP /v1/chat/completions, max_tokens=1, temperature=0, logprob_token_ids = the decision words' first tokens "
             "(from the server's /tokenize): the full log-likelihood of each decision word as the answer's start "
             "(case/space variants summed), as in-process; nothing unscored")
    TOP_K = (f"HTTP /v1/chat/completions, max_tokens=1, temperature=0, top_logprobs={TOP_LOGPROBS}: "
             "probability of each decision's first token (case/space variants summed); "
             "items with no decision among the top tokens are unscored")

    def preflight(self, models: list[str]) -> dict[str, ModelInfo]:
        import openai

        quick = self.client.with_options(timeout=10.0, max_retries=1)
        where = f"--api-base {self.api_base}"
        try:
            listed = list(quick.models.list())
        except openai.APIConnectionError as err:
            cause = err.__cause__ or err
            raise MedtuneError(
                f"{where}: cannot reach the endpoint ({type(cause).__name__}: {cause}); start it with "
                "`medtune serve` (GET /health answers 200 once the models are loaded), or fix --api-base, "
                f"or use --api-base {INPROCESS} to load the models in this process"
            ) from None
        except openai.AuthenticationError:
            raise MedtuneError(
                f"{where}: the server refused the API key (401); export {API_KEY_ENV} with the server's key"
            ) from None
        except openai.APIStatusError as err:
            hint = " (the server is still loading its models; wait for GET /health to answer 200)" if err.status_code == 503 else ""
            raise MedtuneError(f"{where}: GET /models answered {err.status_code}: {_error_message(err)}{hint}") from None
        served = {m.id: m for m in listed}
        missing = [m for m in models if m not in served]
        if missing:
            hint = ""
            if "finetuned" in missing:
                hint = "; `finetuned` is listed only once a checkpoint exists (train one with `make train`)"
            raise MedtuneError(
                f"--models: {', '.join(missing)} not served by {self.api_base} "
                f"(available: {', '.join(sorted(served)) or 'none'}){hint}"
            )
        infos = {}
        for name in models:
            meta = (served[name].model_extra or {}).get("medtune") or {}
            infos[name] = ModelInfo(
                id=name, kind=meta.get("kind") or ("base" if name == "base" else "finetuned"),
                checkpoint=meta.get("checkpoint"), run_id=meta.get("run_id"), step=meta.get("step"),
                base_model=meta.get("base_model"), prompt_type=meta.get("prompt_type"),
                extra={k: v for k, v in meta.items() if k not in ("kind", "checkpoint", "run_id", "step", "base_model", "prompt_type")},
            )
        return infos

    def _call(self, model: str, messages: list[dict], **params):
        """One chat completion; None and a note for a per-item rejection (400/413/422)."""
        import openai

        try:
            return self.client.chat.completions.create(model=model, messages=messages, temperature=0, **params), None
        except openai.APIStatusError as err:
            if err.status_code in (400, 413, 422):
                return None, f"error {err.status_code}: {_error_message(err)}"
            raise MedtuneError(
                f"{self.api_base}: model {model!r} answered {err.status_code} ({_error_message(err)}); stopping"
            ) from None
        except openai.APIConnectionError as err:
            raise MedtuneError(f"{self.api_base}: lost the endpoint while scoring ({err.__cause__ or err}); stopping") from None

    def _server_root(self) -> str:
        return self.api_base[:-3] if self.api_base.endswith("/v1") else self.api_base

    def variants(self, model: str) -> dict[str, list[tuple[list[int], list[str]]]] | None:
        """Each decision's case/space variants as the served model tokenizes them ((ids, token strings) per
        variant), or None where the server has no /tokenize (the top-k fallback is used then)."""
        import httpx

        with self._variants_lock:
            if model in self._variants:
                return self._variants[model]
            out: dict[str, list[tuple[list[int], list[str]]]] | None = {}
            try:
                for label in LABELS:
                    out[label] = []
                    for variant in option_variants(label):
                        resp = httpx.post(f"{self._server_root()}/tokenize", timeout=self._timeout,
                                          headers={"Authorization": f"Bearer {self._key}"},
                                          json={"model": model, "prompt": variant, "add_special_tokens": False,
                                                "return_token_strs": True})
                        if resp.status_code in (404, 405):
                            raise LookupError(f"/tokenize answered {resp.status_code}")
                        if resp.status_code != 200:
                            raise MedtuneError(f"{self.api_base}: model {model!r} answered {resp.status_code} on /tokenize "
                                               f"({resp.text[:200]}); stopping")
                        body = resp.json()
                        out[label].append((list(body["tokens"]), list(body.get("token_strs") or [])))
            except (LookupError, KeyError, ValueError) as err:
                log.warning("%s: no usable /tokenize (%s); likelihood reads the top %d first tokens only",
                            self.api_base, err, TOP_LOGPROBS)
                out = None
                self.method["likelihood"] = self.TOP_K
            except httpx.HTTPError as err:
                raise MedtuneError(f"{self.api_base}: /tokenize failed for model {model!r} ({err}); stopping") from None
            self._variants[model] = out
            return out

    def likelihood(self, model: str, messages: list[dict]) -> Likelihood:
        variants = self.variants(model)
        if variants is not None:
            return self._exact_likelihood(model, messages, variants)
        return self._top_k_likelihood(model, messages)

    def _exact_likelihood(self, model: str, messages: list[dict], variants) -> Likelihood:
        firsts = sorted({ids[0] for vs in variants.values() for ids, _ in vs if ids})
        position, note = self._first_position(model, messages, extra_body={"logprob_token_ids": firsts})
        if position is None:
            return Likelihood(None, note)
        first = {t.token: t.logprob for t in position.top_logprobs}
        scores = {}
        for label, forms in variants.items():
            total = []
            for ids, strs in forms:
                if not ids or (strs[0] if strs else None) not in first:
                    return Likelihood(None, f"the server did not score token {ids[:1]} of {label!r}")
                lp = first[strs[0]]
                if len(ids) > 1:
                    more, note = self._continuation(model, messages, ids, strs)
                    if more is None:
                        return Likelihood(None, note)
                    lp += more
                total.append(lp)
            scores[label] = _logsumexp(total)
        return Likelihood(scores)

    def _continuation(self, model: str, messages: list[dict], ids: list[int], strs: list[str]) -> tuple[float | None, str | None]:
        """log P(ids[1:] | prompt, ids[0]): the answer continued with all but the last token, whose logprob
        comes from logprob_token_ids; the ones between from prompt_logprobs."""
        head = "".join(strs[:-1])
        resp, note = self._call(model, [*messages, {"role": "assistant", "content": head}], max_tokens=1, logprobs=True,
                                extra_body={"logprob_token_ids": [ids[-1]], "continue_final_message": True,
                                            "add_generation_prompt": False, "prompt_logprobs": 0})
        if resp is None:
            return None, note
        content = resp.choices[0].logprobs.content if resp.choices[0].logprobs else None
        prompt_lps = (resp.model_extra or {}).get("prompt_logprobs")
        if not content or not content[0].top_logprobs or prompt_lps is None:
            return None, "the server did not score the continuation"
        total = content[0].top_logprobs[0].logprob
        head_lps = prompt_lps[len(prompt_lps) - (len(ids) - 1):]  # the positions of ids[0] .. ids[-2]
        for i, (token_id, entry) in enumerate(zip(ids[:-1], head_lps)):
            if not entry or str(token_id) not in entry:
                return None, "the continuation was tokenized differently by the server"
            if i > 0:  # ids[0]'s logprob came from the first request
                total += entry[str(token_id)]["logprob"]
        return total, None

    def _first_position(self, model: str, messages: list[dict], **params):
        """The logprobs of the answer's first position (one greedy token), or None and why not."""
        resp, note = self._call(model, messages, max_tokens=1, logprobs=True, **params)
        if resp is None:
            return None, note
        choice = resp.choices[0]
        if choice.finish_reason == "content_filter":
            return None, "blocked"
        content = choice.logprobs.content if choice.logprobs else None
        if not content:
            return None, "no logprobs in the response"
        return content[0], None

    def _top_k_likelihood(self, model: str, messages: list[dict]) -> Likelihood:
        first, note = self._first_position(model, messages, top_logprobs=TOP_LOGPROBS)
        if first is None:
            return Likelihood(None, note)
        # The chosen token is among its own top_logprobs; use it alone only when the list is empty.
        top = [(t.token, t.logprob) for t in first.top_logprobs] or [(first.token, first.logprob)]
        scores = option_logprobs_from_top(top)
        return Likelihood(scores, None if scores else f"no decision among the top {len(top)} tokens")

    def generate(self, model: str, messages: list[dict], max_tokens: int) -> Generation:
        resp, note = self._call(model, messages, max_tokens=max_tokens)
        if resp is None:
            return Generation("", None, note)
        choice = resp.choices[0]
        text = choice.message.content or ""
        return Generation(text, choice.finish_reason, "blocked" if choice.finish_reason == "content_filter" else None)

    def close(self) -> None:
        self.client.close()


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def _error_message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(err, "message", err))


# --- in this process --------------------------------------------------------------------------

@dataclass
class _Loaded:
    tokenizer: object
    adapter: str | None  # LoRA adapter name on the shared PeftModel; None = base weights
    model: object  # the network to run (the shared PeftModel, or a separate full fine-tune)
    vocab: int  # logits beyond this index belong to tokens this model's tokenizer never produces


class LocalBackend:
    """Base model and checkpoints loaded with transformers + PEFT, scored without a server.

    Model ids: `base`, `finetuned` (--checkpoint, else the checkpoint storage's LATEST names) and
    `<run_id>/step_N`. LoRA checkpoints share one copy of the base weights (the base model is the
    same network with its adapters disabled). Prompts use each checkpoint's own tokenizer and chat
    template (the training prompt), and the base model's own template for `base`.
    """

    kind = INPROCESS
    concurrency = 1

    def __init__(self, storage: Path, base_model: Path | None = None, checkpoint: Path | None = None,
                 dtype: str = "float32"):
        self.storage = Path(storage)
        self.base_model = Path(base_model) if base_model else None
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.dtype = dtype
        self.loaded: dict[str, _Loaded] = {}
        self._state: str | None = None  # the adapter the shared network runs now (None: base)
        self._merged = False
        self._keep_last = True  # the model accepts logits_to_keep (switched off on TypeError)
        self.method = {
            "likelihood": (
                f"in-process (transformers + PEFT, {dtype}): full log-likelihood of each decision word as the "
                "continuation of the generation prompt (lm-evaluation-harness style), case/space variants summed"
            ),
            "generate": f"in-process transformers generate, greedy ({dtype})",
        }

    # Resolution happens before anything heavy loads, so a bad id fails in milliseconds.
    def _resolve(self, models: list[str]) -> dict[str, ModelInfo]:
        from medtune.training import checkpoints

        infos: dict[str, ModelInfo] = {}
        problems = []
        available = ["base"]
        latest = None
        try:
            latest = self.checkpoint or checkpoints.latest_checkpoint(self.storage)
        except checkpoints.CheckpointError as err:
            if "finetuned" in models:
                problems.append(f"finetuned: {err}")
        if latest is not None:
            available.append("finetuned")
        runs = self.storage / "runs"
        if runs.is_dir():
            for run in sorted(p for p in runs.iterdir() if p.is_dir()):
                available += [f"{run.name}/step_{step}" for step, _path in checkpoints.list_checkpoints(run)]
        for name in models:
            if name == "base":
                infos[name] = ModelInfo(id=name, kind="base")
                continue
            if name == "finetuned":
                if latest is None:
                    if not any(p.startswith("finetuned:") for p in problems):
                        problems.append(
                            f"finetuned: no checkpoint in {self.storage} (no LATEST); train one with `make train`, "
                            "or pass --checkpoint DIR or --storage DIR"
                        )
                    continue
                path, kind = Path(latest), "finetuned"
            else:
                path = self._checkpoint_path(name)
                if path is None:
                    problems.append(f"{name}: unknown model id (available: {', '.join(available)})")
                    continue
                kind = "checkpoint"
            try:
                manifest = checkpoints.verify_checkpoint(path, check_hashes=False)
            except checkpoints.CheckpointError as err:
                problems.append(f"{name}: {err}")
                continue
            infos[name] = ModelInfo(
                id=name, kind=kind, checkpoint=f"{manifest.get('run_id')}/step_{manifest.get('step')}", run_id=manifest.get("run_id"),
                step=manifest.get("step"), base_model=manifest.get("base_model"), prompt_type=manifest.get("prompt_type"),
                path=str(path), extra={"ckpt_kind": manifest.get("kind", "lora"), "metrics": manifest.get("metrics")},
            )
        if problems:
            raise MedtuneError("--models:\n  " + "\n  ".join(problems))
        # The base weights: --base-model, else the checkpoints' MANIFEST (all must agree).
        bases = {info.base_model for info in infos.values() if info.base_model}
        if self.base_model is None and not bases and latest is not None:
            # Only `base` asked for: the storage's latest checkpoint still names its base model.
            named = checkpoints.read_manifest(Path(latest)).get("base_model")
            bases = {named} if named else set()
        if self.base_model is None:
            if len(bases) > 1:
                raise MedtuneError(f"--models: the checkpoints have different base models ({', '.join(sorted(bases))}); "
                                   "evaluate them in separate runs or pass --base-model")
            if not bases:
                raise MedtuneError(f"--api-base {INPROCESS}: pass --base-model DIR (no checkpoint names a base model)")
            self.base_model = Path(bases.pop())
        if not (self.base_model / "config.json").is_file():
            raise MedtuneError(f"--base-model {self.base_model}: not a model directory (no config.json); "
                               "import one with `medtune model import`")
        for info in infos.values():
            if info.kind == "base":
                info.base_model = str(self.base_model)
        return infos

    def _checkpoint_path(self, name: str) -> Path | None:
        """`<run_id>/step_N` (as the server names checkpoints; zero-padded also accepted) -> its directory."""
        import re

        from medtune.training import checkpoints

        match = re.fullmatch(r"([A-Za-z0-9_-][A-Za-z0-9._-]*)/step_(\d+)", name)
        if match is None:
            return None
        path = self.storage / "runs" / match.group(1) / checkpoints.step_dir_name(int(match.group(2)))
        return path if path.is_dir() else None

    def preflight(self, models: list[str]) -> dict[str, ModelInfo]:
        infos = self._resolve(models)
        self._load(infos)
        return infos

    def _load(self, infos: dict[str, ModelInfo]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = {"float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[self.dtype]
        log.info("loading %s (%s)", self.base_model, self.dtype)
        base_tok = AutoTokenizer.from_pretrained(self.base_model)
        base_net = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=dtype)
        base_vocab = base_net.get_input_embeddings().weight.shape[0]
        shared = base_net
        lora = {n: i for n, i in infos.items() if i.kind != "base" and i.extra.get("ckpt_kind", "lora") == "lora"}
        toks = {n: AutoTokenizer.from_pretrained(i.path) for n, i in infos.items() if i.kind != "base"}
        if lora:
            from peft import PeftModel

            # Checkpoints of prompt types 2/3 add marker tokens: grow the embeddings to match.
            need = max(len(toks[n]) for n in lora)
            if need > base_vocab:
                base_net.resize_token_embeddings(need)
            for k, (name, info) in enumerate(lora.items()):
                adapter = f"m{k}"
                if k == 0:
                    shared = PeftModel.from_pretrained(base_net, info.path, adapter_name=adapter)
                else:
                    shared.load_adapter(info.path, adapter_name=adapter)
                self.loaded[name] = _Loaded(toks[name], adapter, shared, len(toks[name]))
        for name, info in infos.items():
            if info.kind == "base":
                if not base_tok.chat_template:
                    # A pretrained-only base has no template: give it the training prompt instead.
                    other = next(iter(toks.values()), None)
                    if other is None or not other.chat_template:
                        raise MedtuneError(f"--base-model {self.base_model}: its tokenizer has no chat template, "
                                           "and no checkpoint template to fall back on")
                    log.warning("%s has no chat template; base is prompted with the checkpoint's", self.base_model)
                    tok = copy.copy(base_tok)
                    tok.chat_template = other.chat_template
                else:
                    tok = base_tok
                self.loaded[name] = _Loaded(tok, None, shared, len(base_tok))
            elif name not in self.loaded:  # a full fine-tune: its own weights
                net = AutoModelForCausalLM.from_pretrained(info.path, dtype=dtype)
                net.eval()
                self.loaded[name] = _Loaded(toks[name], None, net, len(toks[name]))
        shared.eval()

    def _active(self, m: _Loaded):
        """Switch the shared network to `m`'s weights; a context manager to run it under.

        In float32 a LoRA adapter is merged into the weights while its model runs (LoRA layers
        kept apart cost ~2.5x per decoded token here) and unmerged before another model runs;
        the merged result equals base + adapter up to float rounding. In bf16 merging and
        unmerging would round the base weights a little more each time, so the adapter stays apart.
        """
        from peft import PeftModel

        if not isinstance(m.model, PeftModel):
            return contextlib.nullcontext()
        if self._state != m.adapter:
            if self._merged:
                m.model.base_model.unmerge_adapter()
                self._merged = False
            if m.adapter is not None:
                m.model.set_adapter(m.adapter)
                if self.dtype == "float32":
                    m.model.base_model.merge_adapter([m.adapter])
                    self._merged = True
            self._state = m.adapter
        return m.model.disable_adapter() if m.adapter is None else contextlib.nullcontext()

    def _prompt_ids(self, m: _Loaded, messages: list[dict]) -> list[int]:
        text = m.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template spells out any BOS itself (as at training time; see data build).
        return m.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _max_len(self, m: _Loaded) -> int:
        config = getattr(m.model, "config", None)
        return int(getattr(config, "max_position_embeddings", 0) or 1 << 30)

    def likelihood(self, model: str, messages: list[dict]) -> Likelihood:
        import torch

        m = self.loaded[model]
        ids = self._prompt_ids(m, messages)
        # The training tokenization: the answer is encoded apart from the prompt (data build).
        conts = {label: [m.tokenizer(v, add_special_tokens=False)["input_ids"] for v in option_variants(label)]
                 for label in LABELS}
        longest = max(len(c) for cs in conts.values() for c in cs)
        if len(ids) + longest > self._max_len(m):
            return Likelihood(None, f"prompt too long ({len(ids)} tokens, limit {self._max_len(m)})")
        multi = any(len(c) > 1 for cs in conts.values() for c in cs)
        with torch.inference_mode(), self._active(m):
            out = self._forward_last(m.model, torch.tensor([ids]), use_cache=multi)
            first = torch.log_softmax(out.logits[0, -1, : m.vocab].float(), dim=-1)
            scores = {}
            for label, variants in conts.items():
                total = []
                for cont in variants:
                    lp = float(first[cont[0]])
                    if len(cont) > 1:
                        # Continue from a copy of the prompt's cache: only the continuation runs.
                        more = m.model(input_ids=torch.tensor([cont[:-1]]), past_key_values=copy.deepcopy(out.past_key_values),
                                       use_cache=True)
                        steps = torch.log_softmax(more.logits[0, :, : m.vocab].float(), dim=-1)
                        lp += float(sum(steps[i, tok] for i, tok in enumerate(cont[1:])))
                    total.append(lp)
                scores[label] = float(torch.logsumexp(torch.tensor(total), dim=0))
        return Likelihood(scores)

    def _forward_last(self, net, input_ids, use_cache: bool):
        """Forward pass that computes logits for the last position only where the model allows it
        (`logits_to_keep`): the output head over a 49k vocabulary at every prompt position is a
        fifth of the work for SmolLM2, and only the last one is needed."""
        if self._keep_last:
            try:
                return net(input_ids=input_ids, use_cache=use_cache, logits_to_keep=1)
            except TypeError:
                self._keep_last = False
        return net(input_ids=input_ids, use_cache=use_cache)

    def generate(self, model: str, messages: list[dict], max_tokens: int) -> Generation:
        import torch

        m = self.loaded[model]
        ids = self._prompt_ids(m, messages)
        room = self._max_len(m) - len(ids)
        if room <= 0:
            return Generation("", None, f"error: prompt too long ({len(ids)} tokens)")
        max_new = min(max_tokens, room)
        eos = m.tokenizer.eos_token_id
        with torch.inference_mode(), self._active(m):
            out = m.model.generate(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new, do_sample=False,
                pad_token_id=eos if m.tokenizer.pad_token_id is None else m.tokenizer.pad_token_id,
            )
        new = out[0, len(ids):].tolist()
        finish = "stop" if (new and new[-1] == eos) or len(new) < max_new else "length"
        return Generation(m.tokenizer.decode(new, skip_special_tokens=True), finish)

    def close(self) -> None:
        self.loaded.clear()


def make_backend(api_base: str, *, storage: Path, base_model: Path | None = None, checkpoint: Path | None = None,
                 dtype: str = "float32", timeout: float = 120.0, concurrency: int = 4):
    if api_base.strip().lower() == INPROCESS:
        return LocalBackend(storage, base_model=base_model, checkpoint=checkpoint, dtype=dtype)
    return HttpBackend(api_base, timeout=timeout, concurrency=concurrency)
