# Everything goes through .venv, created on demand with Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Flower 1.41 for bench/compare_flower.py lives in its own venv: it needs protobuf < 7 and
# rich < 15, and fedgrpc pins protobuf 7.36 and rich 15 (constraints.txt).
FLOWER_VENV  := .venv-flower
FLOWER_STAMP := $(FLOWER_VENV)/.installed
# NVIDIA FLARE 2.9 for bench/large_model.py, in its own venv too (bench/nvflare-constraints.txt).
NVFLARE_VENV  := .venv-nvflare
NVFLARE_STAMP := $(NVFLARE_VENV)/.installed
PROTO_SRC := protos/fedgrpc/v1/coordinator.proto

.PHONY: install demo demo-async demo-multihost test test-fast lint format proto bench \
	bench-flower flower-venv bench-large nvflare-venv docker-demo docker-e2e clean help

help: ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependency declarations change.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install fedgrpc with dev tools

demo: install ## coordinator + 3 clients on digits, prints per-round accuracy
	$(PY) -m examples.demo

demo-async: install ## 10 clients on digits, 3 of them 10x slower: async (FedBuff) vs sync
	$(PY) -m examples.demo_async

test: install ## run the whole suite (slow tests included)
	$(PY) -m pytest

test-fast: install ## skip tests marked slow
	$(PY) -m pytest -m "not slow"

lint: install ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

proto: install ## regenerate the committed gRPC stubs from protos/
	$(PY) -m fedcore.proto.generate

bench: install ## performance benchmarks (see docs/performance.md)
	$(PY) -m bench.round_overhead

$(FLOWER_STAMP): bench/flower-constraints.txt
	rm -rf $(FLOWER_VENV)
	$(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOWER_VENV)/bin/python -m pip install --quiet -c bench/flower-constraints.txt 'flwr[simulation]' numpy psutil
	touch $(FLOWER_STAMP)

flower-venv: $(FLOWER_STAMP) ## Flower 1.41 + its Ray simulation in .venv-flower (benchmarks only; not in make test)

bench-flower: install flower-venv ## fedgrpc vs Flower 1.41 at N=8, P=10M (see docs/performance.md)
	$(PY) -m bench.compare_flower

$(NVFLARE_STAMP): bench/nvflare-constraints.txt
	rm -rf $(NVFLARE_VENV)
	$(PYTHON) -m venv $(NVFLARE_VENV)
	$(NVFLARE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NVFLARE_VENV)/bin/python -m pip install --quiet -c bench/nvflare-constraints.txt nvflare psutil
	touch $(NVFLARE_STAMP)

nvflare-venv: $(NVFLARE_STAMP) ## NVIDIA FLARE 2.9 in .venv-nvflare (benchmarks only; not in make test)

bench-large: install nvflare-venv ## 3 clients x 3 rounds at 600M/100M params (fedclient, then bench.client), NVFlare at 100M
	$(PY) -m bench.large_model --fedclients 3 0

demo-multihost: install ## coordinator + 3 clients, each in its own network namespace, mTLS (root)
	$(PY) -m examples.multihost

# `docker compose` (the plugin) where it exists, else Debian's docker-compose (v1.29).
COMPOSE = $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

docker-demo: ## coordinator + 3 clients in containers, mTLS + state volume (needs Docker)
	@command -v docker >/dev/null 2>&1 || { echo "docker-demo: no docker CLI on this machine;" \
	  "install Docker Engine with the compose plugin, or run 'make demo' (processes)" >&2; exit 1; }
	$(COMPOSE) up --build --detach
	docker wait $$($(COMPOSE) ps -q client-0 client-1 client-2)
	$(COMPOSE) logs coordinator | tail -n 25
	$(COMPOSE) run --rm --no-deps coordinator fedserver status --state-dir /state

# As root on Debian without a container registry, docker/host-setup.sh installs docker.io and
# docker-compose, starts dockerd --iptables=false and builds a python:3.11-slim stand-in
# (docs/deploy.md). Not part of `make test`.
# The test's own Docker daemon (docker/host-setup.sh starts it); the host's is left alone.
DOCKER_E2E_HOST ?= unix:///run/fedgrpc-docker/docker.sock

docker-e2e: install ## docker-compose.yml under real Docker: certs, mTLS, 20 rounds, restart
	base=$$(FEDGRPC_DOCKER_HOST=$(DOCKER_E2E_HOST) PYTHON=$(PY) sh docker/host-setup.sh) && \
	  DOCKER_HOST=$(DOCKER_E2E_HOST) FEDGRPC_BASE_IMAGE=$$base \
	  $(PY) -m pytest -m docker -s tests/test_docker_e2e.py

clean:
	rm -rf $(VENV) $(FLOWER_VENV) $(NVFLARE_VENV) build *.egg-info .pytest_cache
