# The two commands the README promises: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
APT_PKGS := wireguard-tools wireguard-go iproute2 iptables nftables iputils-ping \
            prometheus prometheus-alertmanager chromium \
            qemu-system-x86 kmod busybox-static udev file
LISTEN  ?= :9586
SCHEMA  := tools/dashboard-schema
TSC     := $(SCHEMA)/node_modules/.bin/tsc

.PHONY: run test kernel-test lint system-deps venv node-deps clean

$(BIN)/wgnest: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/wgnest

# Debian packages the suite drives for real. --no-install-recommends: a plain install of
# wireguard-tools would pull in a kernel image.
system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Grafana's dashboard model (@grafana/schema) and TypeScript, pinned by package-lock.json;
# tests/test_dashboards.py type-checks dashboards/*.json with them.
$(TSC): $(SCHEMA)/package.json $(SCHEMA)/package-lock.json
	npm ci --prefix $(SCHEMA)
	touch $@

node-deps: $(TSC)

# The main suite, then the kernel stage (tests/kernel/: Debian's kernel booted once under
# QEMU, kernel WireGuard). Both always run; either failing fails `make test`.
test: system-deps venv node-deps lint
	@echo "$(BIN)/pytest"; $(BIN)/pytest; main=$$?; \
	$(MAKE) --no-print-directory kernel-test; kernel=$$?; \
	if [ $$main -ne 0 ]; then exit $$main; fi; exit $$kernel

# Only the kernel stage: `make kernel-test KERNEL_PYTEST_ARGS="-k seed -x"`.
kernel-test: system-deps venv
	$(BIN)/python tests/kernel/stage.py $(KERNEL_PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check exporter tests bench
	$(BIN)/mypy

run: venv
	$(BIN)/wgnest check || true
	$(BIN)/wgnest serve --web.listen-address $(LISTEN)

clean:
	rm -rf $(VENV) build dist $(SCHEMA)/node_modules
