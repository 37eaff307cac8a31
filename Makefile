# The front door: `make run` (the gateway with config/dev.toml) and `make test`.
# Each target installs what it needs, idempotently: Debian packages (as root), the venv,
# the mail user, the test PKI and the development accounts.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= config/dev.toml
PEER_CONFIG ?= config/dev-peer.toml
MAIL_USER := mssgw-mail
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# pyscard builds against libpcsclite-dev; pcscd + vsmartcard-vpcd run the virtual CPS card;
# Dovecot serves the mailboxes; libnss3-tools and openssl are the S/MIME interop peers.
# iproute2 and util-linux put pcscd in a loopback-only network namespace (vpcd listens on every interface).
DEBS := libpcsclite-dev pcscd vsmartcard-vpcd pcsc-tools iproute2 util-linux procps \
        dovecot-core dovecot-imapd dovecot-lmtpd dovecot-sqlite dovecot-pgsql \
        libnss3-tools openssl ca-certificates

DEV_RPPS := 10001234567

.PHONY: run test lint bench fuzz setup debs venv mail-user dev-setup pcsc-up pcsc-down clean

# The demo: the gateway of $(CONFIG) and its peer gateway ($(PEER_CONFIG), another domain), while the virtual
# CPS card of the first practitioner sits in "Gateway Test PCD 00 00"; Ctrl-C stops both gateways, then the card
# and pcscd. README.md, "The demo", walks through sending a signed and encrypted message from one to the other.
run: setup dev-setup pcsc-up
	@trap '$(PY) -m cps.devstack down --state-dir var/pcsc >/dev/null' EXIT; \
	trap : INT TERM; \
	$(PY) -m gateway.cli -c $(CONFIG) demo run --peer-config $(PEER_CONFIG)

# pcscd and the demo card as for `make run` (the PC/SC tests reuse that pcscd and put their own card in
# the second slot); stopped afterwards unless they were already running.
test: setup dev-setup
	@if pgrep -x pcscd >/dev/null; then started=0; else started=1; \
	  $(PY) -m cps.devstack up --state-dir var/pcsc --pki var/pki --rpps $(DEV_RPPS) || exit 1; fi; \
	trap 'if [ $$started = 1 ]; then $(PY) -m cps.devstack down --state-dir var/pcsc >/dev/null; fi' EXIT; \
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check --line-length 120 gateway smime cps directory_sync config tests bench
	$(VENV)/bin/mypy gateway smime cps directory_sync config
	$(VENV)/bin/lint-imports

# The fuzz targets of tests/fuzz with a large budget: FUZZ_SECONDS in all (default 300), two thirds to the Hypothesis
# targets (each runs rounds of fresh examples for its share), one third to atheris (coverage-guided, when
# installed) over the byte-level ones. Failing inputs stay in .hypothesis/ and var/fuzz/.
FUZZ_SECONDS ?= 300

fuzz: setup
	@mkdir -p var/fuzz; \
	targets=$$($(PY) -m tests.fuzz.atheris_run --list 2>/dev/null | wc -l); \
	if $(PY) -c 'import atheris' 2>/dev/null && [ "$$targets" -gt 0 ]; then hyp=$$(( $(FUZZ_SECONDS) * 2 / 3 )); \
	else hyp=$(FUZZ_SECONDS); echo "atheris is not installed: Hypothesis only"; fi; \
	MSSGW_FUZZ_PROFILE=fuzz FUZZ_SECONDS=$$hyp $(PY) -m pytest tests/fuzz -q -s --timeout=0 -p no:cacheprovider || exit 1; \
	if [ $$hyp -lt $(FUZZ_SECONDS) ]; then each=$$(( ($(FUZZ_SECONDS) - hyp) / targets )); [ $$each -ge 1 ] || each=1; \
	  for t in $$($(PY) -m tests.fuzz.atheris_run --list); do echo "== atheris $$t ($$each s)"; \
	    $(PY) -m tests.fuzz.atheris_run $$t -max_total_time=$$each -artifact_prefix=var/fuzz/ -rss_limit_mb=3072 \
	      2>&1 | grep -v 'Failed to find function' | grep -E '^(Done|==)|Error|Traceback|crash|Falsifying' ; \
	    [ $${PIPESTATUS[0]} = 0 ] || exit 1; done; fi

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

setup: debs venv mail-user

# Both demo gateways' PKIs and accounts (`mssgw dev-setup`), their trust space and directories (idempotent).
dev-setup: setup
	$(PY) -m gateway.cli -c $(CONFIG) demo setup --peer-config $(PEER_CONFIG)

pcsc-up: dev-setup
	$(PY) -m cps.devstack up --state-dir var/pcsc --pki var/pki --rpps $(DEV_RPPS)

pcsc-down:
	@test ! -x $(PY) || $(PY) -m cps.devstack down --state-dir var/pcsc

debs:
	@missing=""; \
	for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "Some Debian packages are missing. As root, run:"; \
	    echo "  apt-get install -y --no-install-recommends$$missing"; \
	    exit 1; \
	  fi; \
	fi

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml | debs
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@

mail-user:
	@id -u $(MAIL_USER) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $(MAIL_USER); \
	  else \
	    echo "The mail user is missing. As root, run:"; \
	    echo "  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $(MAIL_USER)"; \
	    exit 1; \
	  fi; }

clean: pcsc-down
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
