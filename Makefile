# Two commands set everything up on a fresh machine (Python 3.11, pip, apt):
#   make demo   installs what is missing, builds the demo model, exports it, smoke-tests the bundle
#   make test   installs what is missing, runs the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgepack-installed
DEMO_MODEL := build/demo-llama
DEMO_OUT := dist

.PHONY: install demo test clean

install: $(STAMP)

# Re-runs only when pyproject.toml (where every pin lives) changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed; install the venv module (Debian: apt-get install python3-venv) and rerun" >&2; exit 2; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[all,test]'
	$(BIN)/python -m pip check
	@touch $@

demo: install
	$(BIN)/python -m edgepack.demo $(DEMO_MODEL)
	$(BIN)/edgepack export $(DEMO_MODEL) --target executorch --out $(DEMO_OUT)
	$(BIN)/edgepack smoke $(DEMO_OUT)/demo-llama

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build $(DEMO_OUT) .pytest_cache
