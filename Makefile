# Two commands do all set-up on a fresh machine:
#   make demo   install, then run a local federation (tiny model, synthetic shards)
#   make test   install, then lint and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
FEDSD := $(VENV)/bin/fedsd
DEMO ?= runs/demo
NODES ?= 2
ROUNDS ?= 2

.PHONY: install host-setup container-host venv-tools images demo test lint bench clean

install: $(VENV)/.installed

# torch==2.13.0+cpu: the CPU wheel (pip's find-links on these machines); a plain
# "torch" would pull a multi-GB CUDA build. GPU hosts use the SuperNode image instead.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0+cpu" -e ".[dev]"
	touch $@

demo: install
	$(FEDSD) tiny-model --out $(DEMO)/model
	$(FEDSD) shards --source synthetic --num-shards $(NODES) --out $(DEMO)/shards
	$(FEDSD) up --local --nodes $(NODES) --rounds $(ROUNDS) --model $(DEMO)/model \
		--shards $(DEMO)/shards --out $(DEMO)/out --run-config "resolution=64"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Host set-up for the container, Kubernetes and Prometheus tests (root, apt, idempotent):
# podman, buildah, runc, debootstrap and their configuration, the debootstrap base image,
# Compose as a docker CLI plugin; Debian's prometheus and promtool. Without it those tests
# fail and say why; they are never skipped. Two halves: `container-host` (apt, the base
# image; no venv) and `venv-tools` (Compose and hadolint into the venv).
host-setup: container-host venv-tools

container-host:
	bash docker/ci-setup.sh --only host
	bash docker/ci-observability.sh

venv-tools: install
	bash docker/ci-setup.sh --only tools $(VENV)

# The :ci images the container and Kubernetes tests run, built before pytest starts. Built
# cold inside the suite, beside four workers of end-to-end deployments, they took 24 min
# at load 20 on 2 cores: the two tests that need them waited that long, and the pip
# installs slowed every deployment past its deadlines. The tests build them again through
# podman's layer cache (seconds per image), so `make images` is optional before a test.
# They need the base image, not the venv.
images: container-host
	bash docker/build.sh --tag $${FEDSD_IMAGE_TAG:-ci}

# Three workers on two cores. The suite is CPU-bound there; with four, the load average
# reached 50-70 in the last three full runs and the compose and Kubernetes runs missed
# their bounds (a probe's `podman exec` took over 13 s for 10 min). Three is not measured
# in a full run yet. One file per worker (a module or session fixture holds one
# deployment: tests that share one live in one file); tests/conftest.py puts the slowest
# files first. (Not loadgroup: pytest 9 ignores the nodeid suffix it relies on.)
# The set-up runs as two parallel chains: the venv (pip, then lint and the venv's tools)
# beside the container host and the images (apt, debootstrap, podman builds): both mostly
# wait on downloads and disks, not on the CPUs.
PYTEST_WORKERS ?= 3
test:
	$(MAKE) --no-print-directory --output-sync=line -j2 images lint venv-tools
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Benchmarks print JSON (see bench/README.md); a few minutes each on 2 CPU cores.
bench: install
	mkdir -p runs
	$(PY) bench/round_overhead.py > runs/bench-round-overhead.json
	$(PY) bench/latent_cache.py > runs/bench-latent-cache.json
	$(PY) bench/ffa_vs_lora.py > runs/bench-ffa-vs-lora.json

clean:
	rm -rf $(VENV) runs
