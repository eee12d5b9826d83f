# failproxy: `make demo` and `make test` work from a fresh clone (Debian 12 with python3 + venv).
# Each creates/refreshes .venv; pip runs again only when pyproject.toml changes (stamp files).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TEST_STAMP := $(VENV)/.stamp-test
BENCH_STAMP := $(VENV)/.stamp-bench
BUILD_STAMP := $(VENV)/.stamp-build
# The hot modules are compiled by mypyc in place (setup.py); an edit makes the build stale, and
# failproxy then runs its .py files (failproxy/_build.py) until `make build` runs again.
SOURCES := $(wildcard failproxy/*.py failproxy/*/*.py failproxy/*/*.pyx failproxy/*/*.pxd vendor/llhttp/*/*.[ch]) setup.py
HAVE_CC := $(shell command -v cc >/dev/null 2>&1 && echo yes)
# The tests that also run on the pure-Python build (what users without a compiler get), less
# the overflow policy's shares of real traffic (`shares`, tests/conftest.py): the same code,
# whose shares a fully loaded machine moves by timing alone on the slower build.
PURE_MARKS := -m "not shares"
PURE_TESTS := tests/test_inprocess.py tests/test_http.py tests/test_failover.py tests/test_layers.py \
	tests/test_room.py tests/test_rawtransport.py tests/test_timer.py tests/test_turnend.py \
	tests/test_accesslog.py tests/test_accessline.py tests/test_buffering.py tests/test_capacity.py \
	tests/test_learning.py tests/test_version.py tests/test_slot.py tests/test_heads.py tests/test_sockio.py \
	tests/test_requestid.py tests/test_responseparser.py tests/test_requestparser.py tests/test_edge.py \
	tests/test_loadshare.py tests/test_localbooks.py
# The suites that meet the C core (failproxy/proxy/_core.pyx), the compiled build's default: the
# requests it answers and those it hands over (a head not whole by its deadline, a half-close, a
# drain, TLS, bodies, unicorn's answers), run again with it off (FAILPROXY_CORE=0), as the
# compiled relay alone serves them; tests/test_core.py runs both sides itself.
RELAY_TESTS := tests/test_http.py tests/test_edge.py tests/test_tls.py tests/test_slowclients.py \
	tests/test_failover.py tests/test_room.py \
	tests/test_unicorn.py

# Debian packages the tests and the benchmark drive, and a command each one provides.
DEB_PACKAGES := nginx-light unicorn wrk haproxy prometheus httperf iproute2 openssl curl \
	dnsmasq-base strace
DEB_COMMANDS := nginx unicorn wrk haproxy promtool httperf ss openssl curl dnsmasq strace

.PHONY: all build demo test test-stress lint typecheck pytest pytest-pure docker-test bench \
	bench-full venv deb-deps clean fuzz soak

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The editable install compiles nothing (FAILPROXY_PURE_BUILD): `make build` compiles in place
# after it, once, profile-guided (setup.py).
$(TEST_STAMP): pyproject.toml | $(BIN)/python
	FAILPROXY_PURE_BUILD=1 $(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-e '.[test]'
	@touch $@

$(BENCH_STAMP): pyproject.toml | $(BIN)/python
	FAILPROXY_PURE_BUILD=1 $(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-e '.[test,bench]'
	@touch $@ $(TEST_STAMP)

venv: $(TEST_STAMP)

# Compile the hot modules when a source changed: with GCC, twice, around a training load
# (setup.py; FAILPROXY_PGO=0 make build: once, without a profile, in half the time).
$(BUILD_STAMP): $(SOURCES) | $(TEST_STAMP)
	FAILPROXY_STRICT_BUILD=$(if $(HAVE_CC),1,0) $(BIN)/python setup.py -q build_ext --inplace
	@touch failproxy/_compiled__mypyc*.so failproxy/*/*.so 2>/dev/null || true
	@touch $@

build: $(BUILD_STAMP)

# Installs the Debian packages only when one of their commands is missing. Works as root
# (no sudo needed) or through sudo; says what to do when neither is possible.
deb-deps:
	@export PATH="$$PATH:/usr/local/sbin:/usr/sbin:/sbin"; \
	missing=""; \
	for c in $(DEB_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "missing commands:$$missing -- installing Debian packages: $(DEB_PACKAGES)"; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "warning: no apt-get; install $(DEB_PACKAGES) by hand (tests that need them will fail)" >&2; \
		exit 0; \
	fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	else echo "error: not root and no sudo; install $(DEB_PACKAGES) as root" >&2; exit 1; fi; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(DEB_PACKAGES)

lint: $(TEST_STAMP)
	$(BIN)/ruff check failproxy tests bench

typecheck: $(TEST_STAMP)
	$(BIN)/mypy failproxy

pytest: $(BUILD_STAMP) deb-deps
	FAILPROXY_EXPECT_BUILD=$(if $(HAVE_CC),compiled,pure) $(BIN)/pytest -q

pytest-pure: $(TEST_STAMP) deb-deps
	FAILPROXY_PURE=1 FAILPROXY_EXPECT_BUILD=pure $(BIN)/pytest -q $(PURE_MARKS) $(PURE_TESTS)

# The image and deploy/compose.yaml in a real Docker engine (installed and started when missing,
# see tests/docker-test.sh). `make test` runs it too, and says SKIP where no engine can run.
docker-test: $(TEST_STAMP)
	PYTHON=$(BIN)/python bash tests/docker-test.sh

# After ruff and mypy, three runs at once: the whole suite on the compiled build (the C core on)
# in the foreground; the Docker test and the pure-Python run in the background (each mostly
# waits, on dockerd or on sockets, and the suite must pass on a busy machine anyway), the
# pure-Python run followed by the compiled relay's alone (RELAY_TESTS, the core off), each into a
# log printed when the foreground run ends. Fails when any of them failed; Ctrl-C stops them all.
test: $(BUILD_STAMP) deb-deps
	$(BIN)/ruff check failproxy tests bench
	$(BIN)/mypy failproxy
	@logs=$$(mktemp -d /tmp/failproxy-test.XXXXXX); docker=; pure=; \
	trap 'rm -rf "$$logs"' EXIT; \
	trap 'kill $$docker $$pure 2>/dev/null; wait; exit 130' INT TERM; \
	DOCKER_TEST_SKIP_OK=1 PYTHON=$(BIN)/python bash tests/docker-test.sh >"$$logs/docker" 2>&1 & \
	docker=$$!; \
	{ FAILPROXY_PURE=1 FAILPROXY_EXPECT_BUILD=pure $(BIN)/pytest -q -p no:cacheprovider \
		$(PURE_MARKS) $(PURE_TESTS) tests/test_build.py >"$$logs/pure" 2>&1; pure_rc=$$?; \
	  if [ -n "$(HAVE_CC)" ]; then FAILPROXY_CORE=0 FAILPROXY_EXPECT_BUILD=compiled \
		$(BIN)/pytest -q -p no:cacheprovider $(RELAY_TESTS) >"$$logs/relay" 2>&1; \
	  else echo "SKIP: no compiled build, no core to turn off" >"$$logs/relay"; fi; relay_rc=$$?; \
	  echo $$relay_rc >"$$logs/relay_rc"; exit $$pure_rc; } & \
	pure=$$!; \
	echo "== pytest, compiled build (the pure-Python run and docker-test go on meanwhile)"; \
	FAILPROXY_EXPECT_BUILD=$(if $(HAVE_CC),compiled,pure) $(BIN)/pytest -q; compiled_rc=$$?; \
	wait $$pure; pure_rc=$$?; \
	echo "== pytest, pure-Python build: $(PURE_TESTS) tests/test_build.py"; cat "$$logs/pure"; \
	echo "== pytest, compiled build with the C core off: $(RELAY_TESTS)"; \
	cat "$$logs/relay" 2>/dev/null; relay_rc=$$(cat "$$logs/relay_rc" 2>/dev/null || echo 1); \
	wait $$docker; docker_rc=$$?; \
	echo "== docker-test"; cat "$$logs/docker"; \
	echo "== exit status: compiled pytest $$compiled_rc, pure pytest $$pure_rc," \
		"relay pytest $$relay_rc, docker-test $$docker_rc"; \
	[ $$compiled_rc = 0 ] && [ $$pure_rc = 0 ] && [ $$relay_rc = 0 ] && [ $$docker_rc = 0 ]

# `make test` on a loaded machine (issue 19): two busy loops keep the CPUs busy while the same
# steps run; STRESS_RUNS=N runs them N times in a row, stopping at the first failure. The loops
# are killed however it ends; the exit status is that of the tests.
STRESS_RUNS ?= 1
test-stress: $(BUILD_STAMP) deb-deps
	@loops=""; trap 'kill $$loops 2>/dev/null' EXIT; trap 'exit 130' INT TERM; \
	for _ in 1 2; do sh -c 'while :; do :; done' & loops="$$loops $$!"; done; \
	for run in $$(seq $(STRESS_RUNS)); do \
		echo "== test-stress: run $$run of $(STRESS_RUNS), busy loops$$loops"; \
		$(MAKE) --no-print-directory test || { status=$$?; \
			echo "== test-stress: run $$run of $(STRESS_RUNS) failed" >&2; exit $$status; }; \
	done; \
	echo "== test-stress: $(STRESS_RUNS) of $(STRESS_RUNS) runs passed"

# The long fuzz run (outside CI, ~10 minutes): tests/test_fuzz.py with the "long" Hypothesis
# profile (random seeds, many more examples, shrinking on). FAILPROXY_FUZZ_SCALE=0.1 runs a tenth.
fuzz: $(BUILD_STAMP)
	FAILPROXY_FUZZ=long $(BIN)/pytest -q -p no:cacheprovider --timeout=3600 tests/test_fuzz.py

# The fault soak (outside CI, ~2 minutes): 10 000 requests through failproxy in front of two
# unicorns whose workers are killed every 2 s; figures in bench/RELIABILITY.md. CI runs 1 000
# (tests/test_soak.py).
soak: $(BUILD_STAMP) deb-deps
	$(BIN)/python -m bench.scenarios.soak --requests 10000 --out bench/out/soak.json

demo: $(BUILD_STAMP) deb-deps
	$(BIN)/failproxy demo

bench: $(BENCH_STAMP) $(BUILD_STAMP) deb-deps
	$(BIN)/python -m bench quick

bench-full: $(BENCH_STAMP) $(BUILD_STAMP) deb-deps
	$(BIN)/python -m bench full

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache bench/out wheelhouse
	rm -f failproxy/*.so failproxy/*/*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
