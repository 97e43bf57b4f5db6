# metald — run `make help` for the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
GEN := src/metald/gen
PROTO := proto/metal/vmprovisioner/v1/vm.proto
IMAGE_DIR ?= $(CURDIR)/build/image
DEBIAN_PACKAGES := qemu-system-x86 busybox-static nftables iptables iproute2 kmod cpio e2fsprogs curl jq
export UNKEY_METALD_IMAGE_DIR ?= $(IMAGE_DIR)

.PHONY: help deps venv gen dev image run demo test test-unit lint bench clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

deps: ## Install the Debian packages metald and its tests use
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/.installed ## Create the virtual environment with metald and its dev tools
$(BIN)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

gen: $(GEN)/.stamp ## Generate protobuf and ConnectRPC code from the proto
$(GEN)/.stamp: $(PROTO) $(BIN)/.installed
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$(GEN) --pyi_out=$(GEN) \
	  --grpc_python_out=$(GEN) \
	  --plugin=protoc-gen-connectrpc=$(BIN)/protoc-gen-connectrpc \
	  --connectrpc_out=$(GEN) --connectrpc_opt=protobuf=google $(PROTO)
	find $(GEN) -type d -exec touch {}/__init__.py \;
	sed -i 's/^from metal\.vmprovisioner\.v1 import/from metald.gen.metal.vmprovisioner.v1 import/' $(GEN)/metal/vmprovisioner/v1/vm_pb2_grpc.py
	touch $@

dev: deps venv gen ## Everything needed to run metald from this checkout

image: $(IMAGE_DIR)/.stamp ## Build the bundled guest image (kernel, initramfs, rootfs)
$(IMAGE_DIR)/.stamp: guest/build-image.sh guest/init
	bash guest/build-image.sh $(IMAGE_DIR)
	touch $@

lint: venv ## ruff
	$(BIN)/ruff check src tests bench

test-unit: dev ## Unit tests only (no root, no VMs)
	$(BIN)/pytest -q tests/unit

test: dev image ## Set everything up and run the whole suite
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q -n 2 --dist loadgroup tests

clean: ## Remove the venv, generated code and built image
	rm -rf $(VENV) $(GEN) build
