# The two commands of a fresh machine (see README):
#   make demo   sets up .venv/ and runs `autopsy analyze` on a bundled example run
#   make test   sets up .venv/ and runs the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup demo test lint bench fixtures clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[all]' -r requirements-dev.txt
	touch $@

DEMO_RUN := fixtures/runs/nan-at-31
# the example run failed, so analyze exits 1 by default (--fail-on error, as in CI); the demo shows the report
DEMO := $(VENV)/bin/autopsy analyze $(DEMO_RUN) --fail-on never

demo: setup
	$(DEMO)
	$(DEMO) --out out/report.html
	$(DEMO) --out out/report.md
	$(DEMO) --out out/report.json

test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/run_all.py

fixtures: setup
	$(PY) fixtures/make_fixtures.py

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
