# The two commands of the README. Both create the environments they need and install what is missing first.
#   make demo   demo corpus -> shards -> tiny native Higgs-Audio v2 trained with ZeRO-3 on 2 CPU ranks -> export
#   make test   the test suite: the native family in .venv, boson's family (the reference) in .venv-boson
# Two environments, because boson_multimodal needs transformers < 4.47 and the native classes >= 5.3:
#   .venv        `pip install -e '.[native]'`  transformers 5.19, the default (make install)
#   .venv-boson  `pip install -e '.[boson]'`   boson_multimodal 0.1.1 on transformers 4.46.3 (make boson)
VENV ?= .venv
BOSON_VENV ?= .venv-boson
PYTHON ?= python3
PY := $(VENV)/bin/python
BOSON_PY := $(BOSON_VENV)/bin/python
STAMP := $(VENV)/.higgs-ds-installed
BOSON_STAMP := $(BOSON_VENV)/.higgs-ds-installed
PIP_FLAGS := --disable-pip-version-check --progress-bar off -q

.PHONY: demo demo-v3 test test-native test-boson install boson lint clean

install: $(STAMP)
boson: $(BOSON_STAMP)

$(STAMP): pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); [ "$$free" -ge 12 ] || \
	  echo "==> warning: $$free GB free here; the two environments need about 12 GB (pip fails with 'No space left on device')"
	@test -x $(PY) || { echo "==> creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> installing higgs-ds[native] (transformers 5.19) into $(VENV) (first time: about 4 minutes, ~7 GB)"
	$(PY) -m pip install $(PIP_FLAGS) -e '.[native,test]'
	@touch $@
	@echo "==> installed $(VENV)"

# boson's environment pins the same torch 2.9.1 as .venv: where .venv is installed on the same filesystem,
# its 4.3 GB of CUDA libraries (the nvidia-* packages) are hard-linked in instead of installed a second time
# (pip then finds them installed; an uninstall in one environment only unlinks its own names).
SITE = -c 'import sysconfig; print(sysconfig.get_path("purelib"))'
$(BOSON_STAMP): pyproject.toml
	@test -x $(BOSON_PY) || { echo "==> creating $(BOSON_VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(BOSON_VENV); }
	@src=$$(test -f $(STAMP) && $(PY) $(SITE)); dst=$$($(BOSON_PY) $(SITE)); \
	if [ -n "$$src" ] && [ -d "$$src/nvidia" ] && [ ! -e "$$dst/nvidia" ]; then \
	  if cp -al "$$src"/nvidia "$$src"/nvidia_*.dist-info "$$dst"/ 2>/dev/null; then \
	    echo "==> $(BOSON_VENV) shares $(VENV)'s CUDA libraries (nvidia-*, hard links: no second copy)"; \
	  else rm -rf "$$dst"/nvidia "$$dst"/nvidia_*.dist-info; fi; \
	fi
	@echo "==> installing higgs-ds[boson] (boson_multimodal 0.1.1, transformers 4.46.3) into $(BOSON_VENV) (about 3 minutes, ~4 GB)"
	$(BOSON_PY) -m pip install $(PIP_FLAGS) -e '.[boson,test]'
	@touch $@
	@echo "==> installed $(BOSON_VENV)"

demo: $(STAMP)
	@echo "==> make demo: the whole pipeline on the bundled corpus (about 3 minutes on 2 cores)"
	$(VENV)/bin/higgs-ds demo

# the same pipeline with a tiny Higgs TTS 3 (runs/demo-v3/; about 2 minutes on 2 cores)
demo-v3: $(STAMP)
	$(VENV)/bin/higgs-ds demo --family v3

# Both suites, each in its own environment; the cross-family checks (boson's code as the reference) run in
# both and must not be skipped here.
test: $(STAMP) $(BOSON_STAMP)
	@echo "==> make test: native suite in $(VENV), then boson's in $(BOSON_VENV) (about 25 minutes on 2 cores)"
	HIGGS_DS_REQUIRE_BOTH_ENVS=1 HIGGS_DS_BOSON_PYTHON=$(abspath $(BOSON_PY)) $(PY) -m pytest
	HIGGS_DS_REQUIRE_BOTH_ENVS=1 HIGGS_DS_NATIVE_PYTHON=$(abspath $(PY)) $(BOSON_PY) -m pytest -m "boson_env or both_envs"

test-native: $(STAMP)
	$(PY) -m pytest

test-boson: $(BOSON_STAMP)
	$(BOSON_PY) -m pytest -m "boson_env or both_envs"

lint: $(STAMP)
	$(PY) -m ruff check higgs_ds tests bench

clean:
	rm -rf runs .pytest_cache
