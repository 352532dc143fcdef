# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install clean-outputs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The quick start: embedded dataset -> teachers -> MTT-VL distillation -> evaluation -> table.
run: $(STAMP)
	$(BIN)/mmdd run $(ARGS)

# The test suite (slow tests are marked and skipped; `make test ARGS="-m slow"` runs them).
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

clean-outputs:
	rm -rf outputs
