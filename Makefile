# The two commands of the quick start: `make demo` and `make test`. Both install what they need.
.PHONY: setup demo test test-debug lint clean

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/shuntflow demo

test: setup lint
	.venv/bin/pytest -q

# The same tests against the debug build of the library (preload/Makefile, DEBUG=1), which aborts
# at any phase change preload/phase.h does not allow.
test-debug: setup lint
	$(MAKE) -C preload DEBUG=1
	SHUNTFLOW_LIBRARY=$(CURDIR)/preload/build/libshuntflow-debug.so .venv/bin/pytest -q

lint:
	.venv/bin/ruff check src tests
	.venv/bin/ruff format --check src tests
	.venv/bin/mypy

clean:
	rm -rf build .venv preload/build bpf/build src/*.egg-info
