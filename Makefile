# Everything the project needs is installed by these targets; nothing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test test-postgres bench-llm bench-tts clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

run: install
	$(BIN)/trtc-backend db upgrade
	$(BIN)/trtc-backend serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-postgres: install
	TEST_POSTGRES_URL=$${TEST_POSTGRES_URL:-postgresql+asyncpg://postgres@127.0.0.1:5432/test} $(BIN)/python -m pytest $(PYTEST_ARGS)

bench-llm: install
	$(BIN)/python bench/llm_bench.py $(BENCH_ARGS)

bench-tts: install
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,bench]"
	$(BIN)/python bench/tts_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
