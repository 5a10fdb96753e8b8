# Two commands: `make repro` and `make test`. Both set up .venv idempotently from constraints.txt first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The scripts of the offline `dvc plots show` page (.dvc/plots_template.html), from the npm registry.
PLOTS_JS := vendor/vega
PLOTS_JS_STAMP := $(PLOTS_JS)/.installed

# No telemetry from any tool we run.
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export SE_AVOID_STATS := true
# Stage commands say `python`: make it the environment's.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test test-gguf bench clean

setup: $(STAMP) $(PLOTS_JS_STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required; set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(PLOTS_JS_STAMP): tools/plots_js.py | $(STAMP)
	$(BIN)/python tools/plots_js.py $(PLOTS_JS)
	touch $(PLOTS_JS_STAMP)

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q

# llama.cpp's Python binding, built from source (PyPI has no wheels): portable code, no examples/tools/server.
LLAMA_CPP_STAMP := $(VENV)/.llama_cpp
$(LLAMA_CPP_STAMP): constraints.txt | $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-binary llama-cpp-python -c constraints.txt llama-cpp-python
	touch $(LLAMA_CPP_STAMP)

# The GGUF export checked by llama.cpp itself (tests marked gguf; `make test` skips them without llama-cpp-python).
test-gguf: setup $(LLAMA_CPP_STAMP)
	PERSONA_LM_REQUIRE_LLAMA_CPP=1 $(BIN)/python -m pytest -q -m gguf

bench: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[bench]"
	$(BIN)/python bench/filter_throughput.py
	$(BIN)/python bench/transcripts.py

clean:
	rm -rf $(VENV) $(PLOTS_JS)
