# The two commands of the README. Both create .venv and install what is missing first.
#   make demo   demo corpus -> shards -> tiny Higgs-Audio trained with ZeRO-3 on 2 CPU ranks -> export
#   make test   the test suite (unit tests, 2-rank ZeRO-3 training through SWIFT, export checks)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.higgs-ds-installed

.PHONY: demo test install lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "==> creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> installing higgs-ds and its pinned stack into $(VENV) (first time: about 4 minutes, ~7 GB)"
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -q -e '.[test]'
	@touch $@
	@echo "==> installed"

demo: $(STAMP)
	@echo "==> make demo: the whole pipeline on the bundled corpus (about 2 minutes on 2 cores)"
	$(VENV)/bin/higgs-ds demo

test: $(STAMP)
	@echo "==> make test: the test suite (about 17 minutes on 2 cores)"
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check higgs_ds tests bench

clean:
	rm -rf runs .pytest_cache
