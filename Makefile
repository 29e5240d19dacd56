# Everything the project needs is installed by these targets; nothing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install browser run test test-loaded test-fast test-postgres bench-llm bench-tts bench-soak fake-upstream clean

install: $(STAMP)

# Under a lock: `make fake-upstream &` and `make run` on a fresh clone both install, one after
# the other (the second finds everything in place), instead of two pips in one .venv at once.
$(STAMP): pyproject.toml constraints.txt
	flock .install.lock sh -c '\
		set -e; \
		test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
		$(BIN)/python -m pip install --quiet --upgrade "pip>=24"; \
		$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"; \
		touch $(STAMP)'

# Debian's chromium and chromedriver, for the console's browser test (tests/test_console.py).
# A machine where they cannot be installed still runs every other test; that one then fails
# and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		( $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver ) \
			|| echo "make browser: could not install chromium and chromium-driver; the console's browser test will fail"; \
	else echo "make browser: no apt-get here; install chromium and chromedriver for the console's browser test"; fi

run: install
	$(BIN)/trtc-backend db upgrade
	$(BIN)/trtc-backend serve --host $(HOST) --port $(PORT)

# On both cores: each xdist worker starts its own servers and databases and takes whole files
# (a module's shared server is started once). TEST_WORKERS=0 runs in this process alone.
TEST_WORKERS ?= 2
PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install browser
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest --durations=10 $(PARALLEL) $(PYTEST_ARGS)

# `make test` with one core kept busy by a spinning process, as on a shared machine: the suite
# must stay green (slower) then too.
test-loaded: install
	$(BIN)/python -c 'while True: pass' & spinner=$$!; trap "kill $$spinner" EXIT; $(MAKE) test

# The inner loop: SQLite only, without the browser test and the benchmarks' smoke runs.
test-fast: install
	env -u TEST_POSTGRES_URL $(BIN)/python -m pytest -q $(PARALLEL) --ignore=tests/test_console.py --ignore=tests/test_benchmarks.py $(PYTEST_ARGS)

test-postgres: install browser
	TEST_POSTGRES_URL=$${TEST_POSTGRES_URL:-postgresql+asyncpg://postgres@127.0.0.1:5432/test} $(BIN)/python -m pytest $(PARALLEL) $(PYTEST_ARGS)

bench-llm: install
	$(BIN)/python bench/llm_bench.py $(BENCH_ARGS)

bench-tts: install
	$(BIN)/python bench/tts_bench.py $(BENCH_ARGS)

# 10 minutes by default; BENCH_ARGS="--minutes 3" (or --quick) for less.
bench-soak: install
	$(BIN)/python bench/soak.py $(BENCH_ARGS)

# A fake OpenAI upstream, to try the stack without a model: on port 9000, or PORT when given.
UPSTREAM_PORT := $(if $(filter command line environment,$(origin PORT)),$(PORT),9000)
fake-upstream: install
	$(BIN)/trtc-backend fake-upstream --host $(HOST) --port $(UPSTREAM_PORT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
