# Two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench store-stop clean

setup: $(STAMP)

# Pinned CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The whole pipeline on the tiny preset with KFP's local runner. Without RUYI_S3_ENDPOINT a local
# SeaweedFS server is started (credentials in .ruyi/s3/s3.env).
demo: $(STAMP)
	@if [ -z "$$RUYI_S3_ENDPOINT" ]; then $(BIN)/ruyi store serve; fi
	@if [ -z "$$RUYI_S3_ENDPOINT" ]; then set -a; . .ruyi/s3/s3.env; set +a; fi; \
	  $(BIN)/ruyi pipeline run --local --spec specs/tiny.yaml

test: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/tier_speed.py --spec specs/tiny.yaml

store-stop: $(STAMP)
	$(BIN)/ruyi store stop

clean:
	rm -rf runs .pytest_cache
