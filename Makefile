# The two commands of the quick start: `make demo` and `make test`. Both install what they need.
.PHONY: setup demo test test-debug lint clean mutants

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

# The mutation check (not part of `test`: one full suite per surviving mutant). Select mutants
# with MUTANTS="byte-dropped ..." and pass pytest arguments with PYTEST_ARGS="-k torture".
mutants: setup
	.venv/bin/python scripts/mutants.py $(MUTANTS) $(if $(PYTEST_ARGS),-- $(PYTEST_ARGS))

lint:
	.venv/bin/ruff check src tests scripts
	.venv/bin/ruff format --check src tests scripts
	.venv/bin/mypy

clean:
	rm -rf build .venv preload/build bpf/build src/*.egg-info
