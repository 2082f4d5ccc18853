# The two commands of the quick start: `make demo` and `make test`. Both install what they need.
.PHONY: setup demo test lint clean

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/shuntflow demo

test: setup lint
	.venv/bin/pytest -q

lint:
	.venv/bin/ruff check src tests
	.venv/bin/ruff format --check src tests
	.venv/bin/mypy

clean:
	rm -rf build .venv preload/build bpf/build src/*.egg-info
