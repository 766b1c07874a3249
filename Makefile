# One-command entry points. Everything installs into .venv; system packages only when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: setup system-deps test test-fast demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,demo]"
	touch $@

# flite / espeak-ng synthesise the demo's and the tests' speech.
system-deps:
	@command -v flite >/dev/null && command -v espeak-ng >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq flite espeak-ng >/dev/null; }

test: setup system-deps
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup system-deps
	$(VENV)/bin/steermoe demo

clean:
	rm -rf $(VENV) demo runs
