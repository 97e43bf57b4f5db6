# metald — run `make help` for the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
GEN := src/metald/gen
PROTO := $(wildcard proto/metal/vmprovisioner/v1/*.proto)
IMAGE_DIR ?= $(CURDIR)/build/image
DEBIAN_PACKAGES := qemu-system-x86 qemu-utils busybox-static nftables iptables iproute2 kmod cpio e2fsprogs curl jq gcc libc6-dev
export UNKEY_METALD_IMAGE_DIR ?= $(IMAGE_DIR)

.PHONY: help deps venv gen dev image run demo test test-unit lint bench clean install uninstall \
	service-install service-start service-stop service-restart service-status service-logs \
	dev-install prod-install health metrics doctor

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

deps: ## Install the Debian packages metald and its tests use
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $$missing >/dev/null; fi

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
	sed -i 's/^from metal\.vmprovisioner\.v1 import/from metald.gen.metal.vmprovisioner.v1 import/' $(GEN)/metal/vmprovisioner/v1/*_pb2*.py
	touch $@

dev: deps venv gen ## Everything needed to run metald from this checkout

image: $(IMAGE_DIR)/.stamp ## Build the bundled guest image (kernel, initramfs, rootfs)
$(IMAGE_DIR)/.stamp: guest/build-image.sh guest/init guest/agent.c
	bash guest/build-image.sh $(IMAGE_DIR)
	touch $@

lint: venv gen ## ruff and mypy (the type check covers src/, generated code excluded)
	$(BIN)/ruff check
	$(BIN)/mypy

test-unit: dev ## Unit tests only (no root, no VMs)
	$(BIN)/pytest -q tests/unit

test: dev image lint ## Set everything up, lint, and run the whole suite
	tests/run-suite.sh

clean: ## Remove the venv, generated code and built image
	rm -rf $(VENV) $(GEN) build

# --- running -------------------------------------------------------------------
METALD_DEV_ENV := UNKEY_METALD_IMAGE_DIR=$(IMAGE_DIR)

run: dev image ## Set everything up and run metald in the foreground on its embedded defaults
	@echo "metald: API on http://127.0.0.1:8080 (SQLite in /opt/metald/data, QEMU backend, image in $(IMAGE_DIR))"
	$(METALD_DEV_ENV) bash scripts/run.sh $(BIN)/metald

demo: dev image ## Against a running metald: create and boot a VM, show its console and HTTP answer, delete it
	bash scripts/demo.sh $(BIN)/metald

health: ## curl the health endpoint
	curl -s http://localhost:8080/_/health | jq .

metrics: ## curl the Prometheus metrics (vm_ and metald_ series)
	curl -s http://localhost:9464/metrics | grep -E '^(vm_|metald_)'

doctor: dev ## Check this host's prerequisites
	$(BIN)/metald doctor

bench: dev image ## Run the benchmarks and write bench/RESULTS.md
	tests/isolated.sh $(BIN)/python -m bench.run

# --- installing (paths from the install guides) -------------------------------
PREFIX ?= /usr/local
OPT := $(DESTDIR)/opt/metald
SYSTEMD_DIR ?= /etc/systemd/system

install: gen image ## Install metald (venv in /opt/metald, /usr/local/bin/metald, unit, tmpfiles, sysctl, logrotate, firewalld)
	install -d -m 0755 $(OPT) $(OPT)/images $(DESTDIR)$(PREFIX)/bin $(DESTDIR)/srv/jailer
	install -d -m 0750 $(OPT)/data $(DESTDIR)/var/log/metald $(DESTDIR)/etc/metald
	$(PY) -m venv --clear $(OPT)/venv
	$(OPT)/venv/bin/pip install -q --upgrade pip
	$(OPT)/venv/bin/pip install -q .
	ln -sf /opt/metald/venv/bin/metald $(DESTDIR)$(PREFIX)/bin/metald
	install -m 0644 $(IMAGE_DIR)/vmlinuz $(IMAGE_DIR)/initramfs.cpio.gz $(IMAGE_DIR)/rootfs.ext4 $(IMAGE_DIR)/cmdline $(OPT)/images/
	install -D -m 0644 deploy/metald.service $(DESTDIR)$(SYSTEMD_DIR)/metald.service
	[ -f $(DESTDIR)/etc/metald/metald.env ] || install -m 0640 deploy/metald.env $(DESTDIR)/etc/metald/metald.env
	install -D -m 0644 deploy/metald.tmpfiles.conf $(DESTDIR)/etc/tmpfiles.d/metald.conf
	install -D -m 0644 deploy/99-metald.conf $(DESTDIR)/etc/sysctl.d/99-metald.conf
	install -D -m 0644 deploy/metald.logrotate $(DESTDIR)/etc/logrotate.d/metald
	install -D -m 0644 deploy/firewalld-metald.xml $(DESTDIR)/etc/firewalld/services/metald.xml
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/metald/README.md
	@if [ -z "$(DESTDIR)" ]; then \
	  systemd-tmpfiles --create /etc/tmpfiles.d/metald.conf 2>/dev/null || mkdir -p /run/netns; \
	  sysctl -p /etc/sysctl.d/99-metald.conf >/dev/null || true; \
	  systemctl daemon-reload 2>/dev/null || true; fi
	@echo "installed; next: make service-install service-start"

uninstall: ## Remove what install put in place (keeps /opt/metald/data and /etc/metald)
	-systemctl disable --now metald 2>/dev/null
	rm -f $(DESTDIR)$(PREFIX)/bin/metald $(DESTDIR)$(SYSTEMD_DIR)/metald.service \
	  $(DESTDIR)/etc/tmpfiles.d/metald.conf $(DESTDIR)/etc/logrotate.d/metald \
	  $(DESTDIR)/etc/firewalld/services/metald.xml
	rm -rf $(OPT)/venv $(OPT)/images $(DESTDIR)$(PREFIX)/share/doc/metald
	-systemctl daemon-reload 2>/dev/null

dev-install: ## Install for development (jailer off)
	$(MAKE) install
	sed -i 's/^#\?UNKEY_METALD_JAILER_ENABLED=.*/UNKEY_METALD_JAILER_ENABLED=false/' $(DESTDIR)/etc/metald/metald.env

prod-install: ## Install for production (jailer on, SPIFFE mTLS)
	$(MAKE) install
	sed -i -e 's/^#\?UNKEY_METALD_JAILER_ENABLED=.*/UNKEY_METALD_JAILER_ENABLED=true/' \
	  -e 's/^#\?UNKEY_METALD_TLS_MODE=.*/UNKEY_METALD_TLS_MODE=spiffe/' $(DESTDIR)/etc/metald/metald.env

service-install: ## Enable the systemd unit
	systemctl daemon-reload
	systemctl enable metald

service-start: ## Start metald
	systemctl start metald

service-stop: ## Stop metald (VMs keep running)
	systemctl stop metald

service-restart: ## Restart metald (VMs keep running)
	systemctl restart metald

service-status: ## Show the unit's status
	systemctl status metald --no-pager

service-logs: ## Follow the journal
	journalctl -u metald -f
