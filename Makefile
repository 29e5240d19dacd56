# Everything the project needs is installed by these targets; nothing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install browser nginx run test test-loaded test-fast test-postgres bench-llm bench-tts bench-soak bench-knowledge bench-fast-reply bench-remote-voices fake-upstream clean

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

# Debian packages some tests need, installed with apt-get (as root, or with sudo). Where they
# cannot be installed every other test still runs; the ones that need them fail and say why.
# $(1): the packages; $(2): a command that succeeds once they are there.
define apt_install
	@if $(2) >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		( $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(1) ) \
			|| echo "make: could not install $(1); the tests that need them will fail"; \
	else echo "make: no apt-get here; install $(1) for the tests that need them"; fi
endef

# Debian's chromium and chromedriver, for the console's browser test (tests/test_console.py).
browser:
	$(call apt_install,chromium chromium-driver,command -v chromium && command -v chromedriver)

# Debian's nginx, for the test of the README's reverse-proxy example (tests/test_reverse_proxy.py).
nginx:
	$(call apt_install,nginx,test -x /usr/sbin/nginx)

run: install
	$(BIN)/trtc-backend db upgrade
	$(BIN)/trtc-backend serve --host $(HOST) --port $(PORT)

# On both cores: each xdist worker starts its own servers and databases and takes whole files
# (a module's shared server is started once). TEST_WORKERS=0 runs in this process alone.
TEST_WORKERS ?= 2
PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install browser nginx
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest --durations=10 $(PARALLEL) $(PYTEST_ARGS)

# `make test` with one core kept busy by a spinning process, as on a shared machine: the suite
# must stay green (slower) then too.
test-loaded: install
	$(BIN)/python -c 'while True: pass' & spinner=$$!; trap "kill $$spinner" EXIT; $(MAKE) test

# The inner loop: SQLite only, without the browser test and the benchmarks' smoke runs.
test-fast: install
	env -u TEST_POSTGRES_URL $(BIN)/python -m pytest -q $(PARALLEL) --ignore=tests/test_console.py --ignore=tests/test_benchmarks.py $(PYTEST_ARGS)

test-postgres: install browser nginx
	TEST_POSTGRES_URL=$${TEST_POSTGRES_URL:-postgresql+asyncpg://postgres@127.0.0.1:5432/test} $(BIN)/python -m pytest $(PARALLEL) $(PYTEST_ARGS)

bench-llm: install
	$(BIN)/python bench/llm_bench.py $(BENCH_ARGS)

# Retrieval quality on the evaluation set, memory per base size, TTFT added by `knowledge: auto`.
bench-knowledge: install
	$(BIN)/python bench/knowledge_bench.py $(BENCH_ARGS)

# Time to first text with and without a profile's fast_reply, against a slow and a quick main model.
bench-fast-reply: install
	$(BIN)/python bench/fast_reply_bench.py $(BENCH_ARGS)

# First audio through this server fronting a remote engine, against the engine called directly.
bench-remote-voices: install
	$(BIN)/python bench/remote_voice_bench.py $(BENCH_ARGS)

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
