# Two commands do all set-up on a fresh Debian machine, as root:
#   make test   installs apt packages and a venv, then runs ruff and the whole suite
#   make demo   runs two daemons in network namespaces and shows traffic through the tunnel
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := wireguard-go wireguard-tools iperf3 nftables socat tmux iputils-ping curl iproute2 procps kmod
APT_MARK := $(VENV)/.apt-done

.PHONY: test demo bench lint apt venv clean

$(APT_MARK):
	@mkdir -p $(VENV)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

$(VENV)/.venv-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

apt: $(APT_MARK)
venv: $(VENV)/.venv-done

lint: venv
	$(VENV)/bin/ruff check .

test: apt venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

demo: apt venv
	$(PY) -m wgvsock.demo

bench: apt venv
	$(PY) bench/core_bench.py
	$(PY) bench/tunnel_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
