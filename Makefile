# prefixkv: the two entry points of the README.
#   make run   installs what the CLI needs (scripts/setup.sh run), builds only the prefixkv program,
#              and describes the bundled example image
#   make test  installs what the tests need (scripts/setup.sh test), builds everything (the tests
#              included), and runs the whole test suite
# Both use the same build folder. `make run` configures a fresh folder without the tests (so it needs
# no GoogleTest); `make test` turns them on (-DPREFIXKV_TESTS=ON), and a later `make run` leaves
# that setting alone and still builds only the prefixkv target.
BUILD ?= build
JOBS ?= $(shell nproc)
MODEL ?= models/prefixkv-llava-tiny
IMAGE ?= data/example.png
CMAKE_CONFIGURE = cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release

.PHONY: all deps deps-run build build-run run test clean python

all: build

# What `make test` needs (scripts/setup.sh test: the CLI's libraries, GoogleTest, node and npm).
deps:
	@bash scripts/setup.sh test

# What `make run` needs (scripts/setup.sh run: no GoogleTest, no node).
deps-run:
	@bash scripts/setup.sh run

# Everything, the tests included.
build: deps
	@$(CMAKE_CONFIGURE) -DPREFIXKV_TESTS=ON >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

# Only the prefixkv program. A folder that has no CMakeCache.txt yet is configured without the tests.
build-run: deps-run
	@$(CMAKE_CONFIGURE) $$([ -f $(BUILD)/CMakeCache.txt ] || echo -DPREFIXKV_TESTS=OFF) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) --target prefixkv

run: build-run
	$(if $(filter /%,$(BUILD)),,./)$(BUILD)/prefixkv run --model $(MODEL) --image $(IMAGE) --prompt "Describe the image in detail." --max-tokens 300

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD)

# ---- The Python module (docs/PYTHON.md). `make python` installs what it needs (scripts/setup.sh
# python), builds it in $(BUILD) (-DPREFIXKV_PYTHON=ON; a fresh folder without the tests), makes the
# virtual environment $(VENV) with Debian's python ($(PYTHON), --system-site-packages: its numpy)
# and installs the package there with pip, offline (--no-index, --no-build-isolation: setup.py
# builds nothing more than the target already built). `make test` builds and tests the module too.
PYTHON ?= /usr/bin/python3
VENV ?= .venv

python:
	@bash scripts/setup.sh python
	@$(CMAKE_CONFIGURE) -DPREFIXKV_PYTHON=ON -DPython_EXECUTABLE=$(PYTHON) \
	  $$([ -f $(BUILD)/CMakeCache.txt ] || echo -DPREFIXKV_TESTS=OFF) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) --target prefixkv_python
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv --system-site-packages $(VENV)
	@PREFIXKV_BUILD=$(abspath $(BUILD)) $(VENV)/bin/python -m pip install -q --no-index --no-build-isolation \
	  --disable-pip-version-check .
	@$(VENV)/bin/python -c "import prefixkv, os; print('prefixkv is installed in $(VENV):', os.path.dirname(prefixkv.__file__))"

# ---- Reliability (docs/RELIABILITY.md): fuzzing and the tests under sanitizers. Each has its own
# build folder (never $(BUILD)); clang; the CUDA back end off.
#   make fuzz           the libFuzzer targets of tests/fuzz, FUZZ_SECONDS each (scripts/fuzz.sh)
#   make test-sanitize  the whole CPU test suite under AddressSanitizer + UndefinedBehaviorSanitizer
#   make test-tsan      the scheduler and server tests under ThreadSanitizer
# Sanitizer reports are written to files (<build>/sanitizer-logs/): a report in a child process (the
# prefixkv program a test runs) would otherwise only change its exit status, which a test expecting
# an error cannot tell apart. Any report fails the target, as does any failed test.
FUZZ_SECONDS ?= 30
FUZZ_TARGETS ?=
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
SAN_CONFIGURE = CC=clang CXX=clang++ cmake -S . -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	"-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only" -DPREFIXKV_CUDA=OFF -DPREFIXKV_TESTS=ON
# Fail on sanitizer report files, printing the first ones. $(1): the build folder.
SAN_CHECK_LOGS = if ls $(1)/sanitizer-logs/* >/dev/null 2>&1; then \
	  for f in $(1)/sanitizer-logs/*; do echo "== $$f"; head -60 "$$f"; done; \
	  echo "sanitizer reports: $$(ls $(1)/sanitizer-logs | wc -l) file(s) in $(1)/sanitizer-logs"; rc=1; fi
ASAN_LOGS = $(abspath $(ASAN_BUILD))/sanitizer-logs
ASAN_OPTS = log_path=$(ASAN_LOGS)/asan:detect_leaks=1:check_initialization_order=1:strict_init_order=1
UBSAN_ENV = UBSAN_OPTIONS=log_path=$(ASAN_LOGS)/ubsan:print_stacktrace=1:halt_on_error=1
# ServerLoad bounds the server's RSS growth after its load (48 MiB): ASan keeps 256 MiB of freed
# memory poisoned (the quarantine), so that test runs apart with a small quarantine.
SAN_SMALL_QUARANTINE = quarantine_size_mb=8:allocator_release_to_os_interval_ms=100
TSAN_FILTER ?= ServeScheduler.*:ServeService.*:ServerHttp.*:ServerOpenAIClient.*
TSAN_LOGS = $(abspath $(TSAN_BUILD))/sanitizer-logs
TSAN_OPTS = log_path=$(TSAN_LOGS)/tsan:halt_on_error=0:second_deadlock_stack=1
# ServerLoad (64 clients) runs apart: its RSS bound holds under TSan only when the allocator gives
# memory back soon and the shadow memory is flushed (every 500 ms; it forgets older accesses).
TSAN_LOAD_FILTER ?= ServerLoad.*
TSAN_LOAD_OPTS = allocator_release_to_os_interval_ms=100:flush_memory_ms=500

.PHONY: fuzz test-sanitize test-tsan

fuzz:
	@bash scripts/setup.sh sanitize
	@bash scripts/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

test-sanitize:
	@bash scripts/setup.sh sanitize
	@$(SAN_CONFIGURE) -B $(ASAN_BUILD) -DPREFIXKV_SANITIZE=address,undefined >/dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS)
	@rm -rf $(ASAN_LOGS) && mkdir -p $(ASAN_LOGS)
	@rc=0; cd $(ASAN_BUILD) && \
	{ ASAN_OPTIONS=$(ASAN_OPTS) $(UBSAN_ENV) ctest --output-on-failure -j $(JOBS) -E '^ServerLoad\.' || rc=1; } && \
	{ ASAN_OPTIONS=$(ASAN_OPTS):$(SAN_SMALL_QUARANTINE) $(UBSAN_ENV) ctest --output-on-failure -R '^ServerLoad\.' || rc=1; }; \
	cd $(CURDIR) && $(call SAN_CHECK_LOGS,$(ASAN_BUILD)); exit $$rc

test-tsan:
	@bash scripts/setup.sh tsan
	@$(SAN_CONFIGURE) -B $(TSAN_BUILD) -DPREFIXKV_SANITIZE=thread >/dev/null
	@cmake --build $(TSAN_BUILD) -j $(JOBS) --target pkv_tests prefixkv
	@rm -rf $(TSAN_LOGS) && mkdir -p $(TSAN_LOGS)
	@rc=0; TSAN_OPTIONS=$(TSAN_OPTS) $(TSAN_BUILD)/tests/pkv_tests --gtest_filter='$(TSAN_FILTER)' || rc=1; \
	$(if $(TSAN_LOAD_FILTER),TSAN_OPTIONS=$(TSAN_OPTS):$(TSAN_LOAD_OPTS) \
	  $(TSAN_BUILD)/tests/pkv_tests --gtest_filter='$(TSAN_LOAD_FILTER)' || rc=1;) \
	$(call SAN_CHECK_LOGS,$(TSAN_BUILD)); exit $$rc
