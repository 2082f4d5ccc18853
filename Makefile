# The two commands of the quick start: `make demo` and `make test`. Both install what they need.
.PHONY: setup demo test test-debug test-asan fuzz lint clean mutants callcost

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

# The router's native switch path built with AddressSanitizer and UndefinedBehaviorSanitizer
# (switchpath/Makefile, SANITIZE=1). First the C/Python agreement tests load it in-process, then
# the tests run with every router they start loading it (SHUNTFLOW_SWITCHPATH) under the ASan
# runtime, which only the routers get (SHUNTFLOW_ROUTER_PRELOAD, shuntflow.native.router_command).
# A sanitizer report kills the router: its log has the report, the test fails. Narrow the second
# run with PYTEST_ARGS="tests/unit/test_router_switch.py"; the first run is the one for tests that
# load the switch path into pytest itself (ASAN_IN_PROCESS).
ASAN_RUNTIME = $(shell gcc -print-file-name=libasan.so)
ASAN_SWITCHPATH = $(CURDIR)/switchpath/build/libsfswitch-asan.so
# The tests that load the switch path into pytest itself (tests/switchpath.py).
ASAN_IN_PROCESS = tests/unit/test_switchpath_frames.py tests/integration/test_switchpath_netns.py
test-asan: setup lint
	$(MAKE) -C switchpath SANITIZE=1
	SHUNTFLOW_SWITCHPATH=$(ASAN_SWITCHPATH) LD_PRELOAD=$(ASAN_RUNTIME) ASAN_OPTIONS=detect_leaks=0 \
		.venv/bin/pytest -q -p no:cacheprovider $(ASAN_IN_PROCESS)
	SHUNTFLOW_SWITCHPATH=$(ASAN_SWITCHPATH) SHUNTFLOW_ROUTER_PRELOAD=$(ASAN_RUNTIME) \
		.venv/bin/pytest -q $(ASAN_IN_PROCESS:%=--ignore=%) $(PYTEST_ARGS)

# The switch path's libFuzzer harnesses (switchpath/fuzz/), a million inputs each: any crash,
# sanitizer report or failed harness check fails the run and keeps the input. A short run is part
# of `make test` (tests/unit/test_switchpath_fuzz.py). Choose with FUZZERS="fuzz_libframe ...".
FUZZ_RUNS ?= 1000000
fuzz: setup
	.venv/bin/python scripts/fuzz.py --runs $(FUZZ_RUNS) $(FUZZERS)

# The mutation check (not part of `test`: one full suite per surviving mutant). Select mutants
# with MUTANTS="byte-dropped ..." and pass pytest arguments with PYTEST_ARGS="-k torture".
mutants: setup
	.venv/bin/python scripts/mutants.py $(MUTANTS) $(if $(PYTEST_ARGS),-- $(PYTEST_ARGS))

# What a wrapped data call costs, with no library and in each configuration of it (TSC cycles;
# docs/performance.md, "The library's own cost").
callcost:
	$(MAKE) -C preload
	$(CC) -O2 -Wall -Wextra -pthread -o preload/build/callcost scripts/callcost.c
	./scripts/callcost.sh preload/build/libshuntflow.so

lint:
	.venv/bin/ruff check src tests scripts
	.venv/bin/ruff format --check src tests scripts
	.venv/bin/mypy

clean:
	rm -rf build .venv preload/build bpf/build switchpath/build src/*.egg-info
