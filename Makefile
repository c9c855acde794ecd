# Taskhook: `make run` starts the whole stack, `make test` runs the whole suite.
# Both work from a fresh clone: they find Python >= 3.12, build .venv and install what they need.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000
# The fast layer runs in TEST_PROCESSES processes (pytest-xdist, one test file per process at a
# time; 0: in this one process). The tests that start real processes, kill them and stop Redis
# under them run after it in one process: they wait out real time, and under a loaded machine's
# parallel runs a Redis-outage scenario failed (tests/README.md).
TEST_PROCESSES ?= 3

# Python >= 3.12: the pyenv version named in .python-version first, then whatever is on PATH.
PYTHON_BOOT := $(shell \
  for c in "$$(pyenv root 2>/dev/null)/versions/$$(cat .python-version 2>/dev/null)"*/bin/python \
           python3.13 python3.12 "$$(pyenv root 2>/dev/null)"/versions/3.1[2-9]*/bin/python python3; do \
    if command -v "$$c" >/dev/null 2>&1 && "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
      echo "$$c"; break; fi; done)

.PHONY: run dev test lint bench install migrate clean dotenv

# Local runs are development runs unless the environment says otherwise (production sets
# DEBUG=false and SECRET_KEY; see README "Deployment").
run dev test bench migrate lint: export DEBUG ?= true

# Whether the shell configures Taskhook itself (read before the line above sets DEBUG for make).
SHELL_CONFIGURED := $(filter-out undefined,$(origin DEBUG) $(origin SECRET_KEY))

# The first `make run`/`make dev` from a shell that sets neither DEBUG nor SECRET_KEY writes .env
# from .env.example (DEBUG=true, callbacks to 127.0.0.1 allowed), so that the commands the README
# runs beside it (manage.py createapplication, ...) see the same local settings as the stack. A
# shell that does configure Taskhook (CI and the test suite set DEBUG, production sets DEBUG=false
# and SECRET_KEY) gets no .env, and settings never let .env override the environment.
dotenv:
	@if [ ! -e .env ] && [ -z "$(SHELL_CONFIGURED)" ]; then \
	  cp .env.example .env && echo "Created .env from .env.example (local development settings: DEBUG=true, callbacks to 127.0.0.1 allowed)."; \
	fi

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -n "$(PYTHON_BOOT)" || { echo "Python >= 3.12 not found (pyenv install 3.12, or put python3.12 on PATH)"; exit 1; }
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q -e 'clients/python[test]'
	@touch $(STAMP)

install: $(STAMP)

migrate: $(STAMP)
	@mkdir -p var
	$(PY) manage.py migrate --noinput -v 0

# Web (gunicorn), RQ workers with the scheduler, the periodic jobs and, when REDIS_URL is unset
# or unreachable, an embedded Redis under var/. Ctrl-C stops all of them.
run: dotenv migrate
	$(PY) manage.py runstack --port $(PORT)

# Same stack with uvicorn reloading on code changes instead of gunicorn.
dev: dotenv migrate
	$(PY) manage.py runstack --port $(PORT) --dev

test: $(STAMP)
	@bash .ci/ensure-chromium
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m dashboard.runtime.embedded_redis exec -- $(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile -m "not processes and not browser" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m dashboard.runtime.embedded_redis exec -- $(PY) -m pytest -m "processes or browser" $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Raw RQ vs Taskhook on SQLite + embedded Redis, and on PostgreSQL + Redis when DATABASE_URL
# and REDIS_URL point at them; writes docs/benchmarks.md.
bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null)
	$(PY) bench/run.py
	$(PY) bench/pipeline.py
	env -u DATABASE_URL -u REDIS_URL $(PY) -m dashboard.runtime.embedded_redis exec -- $(PY) bench/isolation.py
	env -u DATABASE_URL -u REDIS_URL $(PY) -m dashboard.runtime.embedded_redis exec -- $(PY) bench/blocking.py
	env -u DATABASE_URL -u REDIS_URL $(PY) -m dashboard.runtime.embedded_redis exec -- $(PY) bench/servers.py

clean:
	rm -rf $(VENV) var
