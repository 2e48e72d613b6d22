# Two commands do all set-up on a fresh Debian machine, as root:
#   make test   installs apt packages and a venv, then runs ruff and the whole suite
#   make demo   runs parent and enclave from one profile in namespaces, ends in the dashboard
# The venv's interpreter: the distribution's /usr/bin/python3 when it is 3.11 or newer, else the
# first python3 on PATH; `make PYTHON=...` chooses another. Debian's is built with profile-guided
# optimisation and LTO, libpython linked into the binary; pyenv's default build (the python3 on
# this machine's PATH) has neither, and on it our daemon took 8-17 % more CPU per megabyte at MTU
# 1420 and 12-14 % longer round trips (bench/README.md, nineteenth round).
ifndef PYTHON
PYTHON := $(shell for p in /usr/bin/python3 python3; do "$$p" -c 'import os, sys;             sys.version_info >= (3, 11) and print(os.path.realpath(sys.executable))'             2>/dev/null | grep . && break; done)
endif
VENV   := .venv
PY     := $(VENV)/bin/python
# podman + debootstrap build and run the enclave image in tests/net/test_image.py; systemd gives
# systemd-analyze, which checks parent/wgvsock-parent@.service, and systemd-container gives
# systemd-nspawn, in which tests/net/test_systemd.py boots systemd to run that unit. qemu-system-x86, linux-image-amd64,
# busybox-static and cpio make the throw-away guest of tests/guest (real vsock, the kernel's WireGuard).
# dnsmasq-base (the binary, without the system service that the dnsmasq package enables) is the
# "internet" resolver of tests/net/test_egress_names.py (egress by host name). gcc and python3-dev
# compile the per-packet modules with mypyc (setup.py); libssl-dev has the OpenSSL headers of
# wgvsock/core/_transport_aead.c. python3-venv lets Debian's python3 (PYTHON below) make the venv.
# acl gives setfacl, with which tests/test_enclave_cmd.py sets the POSIX ACLs on which the early
# check of CMD is compared with the user's exec.
# `make demo` needs only the first list (the demo's tools, the venv and the compile): a first
# demo does not wait for qemu, podman, a kernel image and the rest that only the tests use.
DEMO_APT_PACKAGES := iperf3 nftables iputils-ping curl iproute2 procps kmod dnsmasq-base \
                     gcc python3-dev python3-venv libssl-dev
APT_PACKAGES := $(DEMO_APT_PACKAGES) wireguard-go wireguard-tools socat tmux \
                podman debootstrap systemd systemd-container qemu-system-x86 linux-image-amd64 busybox-static cpio \
                valgrind acl
APT_MARK := $(VENV)/.apt-done
DEMO_APT_MARK := $(VENV)/.apt-demo-done

.PHONY: FORCE test demo bench fuzz soak lint apt apt-demo venv compile clean lock wheelhouse image eif

# Re-checked when this file changes, so a package added to the list gets installed. Without
# apt-get (Amazon Linux, where README's Quick start runs `make eif`) nothing is installed: the
# image and the EIF need none of these, and `make test` is for Debian. One list at a time, under
# a lock on this file (flock, util-linux): under make -j the demo's mark, which the venv waits
# for, is made beside the whole list's, and a second apt-get at once fails on apt's lock; the
# one that waited looks for what is missing after the first is done.
APT_LOCK := $(abspath $(lastword $(MAKEFILE_LIST)))
define apt_install
	@mkdir -p $(VENV)
	@if ! command -v apt-get >/dev/null; then \
	  echo "no apt-get here: not installing the apt packages (make test and make demo need them)"; \
	else exec 9<'$(APT_LOCK)' && flock 9 || exit 1; missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi; fi
	@touch $@
endef
$(APT_MARK): Makefile
	$(call apt_install,$(APT_PACKAGES))
	@touch $(DEMO_APT_MARK)
$(DEMO_APT_MARK): Makefile
	$(call apt_install,$(DEMO_APT_PACKAGES))

# Made again, from scratch, when pyproject.toml or the interpreter changes (.interpreter holds
# its path, rewritten only when it differs). Debian's python3-venv comes with the apt packages,
# so those go first (order only: the mark lives in the venv, which --clear empties).
$(VENV)/.interpreter: FORCE
	@mkdir -p $(VENV)
	@echo '$(PYTHON)' | cmp -s - $@ || echo '$(PYTHON)' > $@

$(VENV)/.venv-done: pyproject.toml $(VENV)/.interpreter | $(DEMO_APT_MARK)
	@test -n '$(PYTHON)' || { echo "wgvsock needs Python 3.11 or newer: neither /usr/bin/python3 \
	nor python3 on PATH is; install one, or name it with make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)
	@echo '$(PYTHON)' > $(VENV)/.interpreter
	$(PY) -m pip install -q --upgrade pip
	WGVSOCK_PURE=1 $(PY) -m pip install -q -e '.[test]'
	@touch $@

# The per-packet modules ([tool.wgvsock] in pyproject.toml) compiled in place with mypyc, again
# whenever a source they are made from changes: an extension left from older sources would be
# imported instead of them (tests/conftest.py refuses to run then). WGVSOCK_PURE=1 removes the
# extensions and runs everything as pure Python.
BUILD_KIND := $(if $(filter-out 0,$(WGVSOCK_PURE)),pure,mypyc)
$(VENV)/.built-$(BUILD_KIND): $(VENV)/.venv-done setup.py build_backend.py \
                              $(wildcard wgvsock/core/*.py wgvsock/core/*.[ch] wgvsock/conn/*.py wgvsock/device/*.py wgvsock/device/*.c)
	rm -f $(VENV)/.built-* wgvsock_native__mypyc.*.so wgvsock/*/*.so
	$(if $(filter pure,$(BUILD_KIND)),WGVSOCK_PURE=1) $(PY) -m pip install -q --no-deps -e .
	@touch $@

apt: $(APT_MARK)
apt-demo: $(DEMO_APT_MARK)
venv: $(VENV)/.venv-done
compile: $(VENV)/.built-$(BUILD_KIND)

lint: venv
	$(VENV)/bin/ruff check .

test: apt venv compile
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

demo: apt-demo venv compile
	$(PY) -m wgvsock.ui.demo

# Two tables: the direct one (README's Speed section), then the parent's forwarding case, an
# enclave's uploads and downloads through a parent to a third namespace (ours, ours -> seed,
# the seed; bench/README.md, thirty-second round).
bench: apt venv compile
	$(PY) bench/core_bench.py
	$(PY) bench/tunnel_bench.py
	$(PY) bench/tunnel_bench.py --forward --case ours-tcp --case ours-seed-tcp --case seed-tcp

# Not part of `make test` (which runs a short version, tests/test_fuzz_targets.py): >= 10^6
# inputs into the core and >= 10^4 into each parser, on 2 processes. FUZZ_SEED=N or =random.
fuzz: venv
	$(PY) -m fuzz $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

# 30 minutes of traffic, rekeys and parent/enclave restarts; reports recovery times, RSS, fds,
# threads and lost pings (bench/soak.py). Not part of `make test`, which runs a 3-minute version.
soak: apt venv compile
	$(PY) bench/soak.py

# The enclave image (docker/Dockerfile; see docker/README.md). Overrides: ENGINE=docker|podman,
# BASE=image (default python:3.11-slim), TAG=name:tag, EIF=path, SOURCE_DATE_EPOCH=seconds.
TAG ?= wgvsock-enclave:latest
EIF ?= build/wgvsock-enclave.eif
BUILD_ARGS = --tag $(TAG) $(if $(BASE),--base $(BASE)) $(if $(ENGINE),--engine $(ENGINE)) \
             $(if $(SOURCE_DATE_EPOCH),--epoch $(SOURCE_DATE_EPOCH))

lock: venv          ## re-pin docker/requirements.lock and docker/build.lock from the venv
	$(PY) docker/lock.py

wheelhouse: venv    ## docker/wheels: the locked wheels plus wgvsock's own (needs PyPI)
	$(PY) docker/build.py wheelhouse

image: venv         ## make wheelhouse, then the enclave image with docker or podman
	$(PY) docker/build.py image $(BUILD_ARGS)

eif: venv           ## checks for nitro-cli, make image, then nitro-cli build-enclave + PCRs
	$(PY) docker/build.py eif $(BUILD_ARGS) --output $(EIF)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info docker/wheels build
	rm -f wgvsock_native__mypyc.*.so wgvsock/*/*.so
