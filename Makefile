# kvmesh - thin wrapper over CMake. The two commands a new user needs:
#   make demo   install missing packages, build, run the main demo
#   make test   install missing packages, build, run every test (plus the ASan+UBSan build of the tests)
BUILD      ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
# the tests whose code runs on several threads (the CPU kernels' pool, the atomic counted allocator, cJSON hooks)
TSAN_TESTS ?= test_core_alloc|test_api|test_sched_batch|test_engine|test_decode|test_stories260k|test_graph_exec|test_kvcomm_ops|test_kv_store|test_lua_sandbox|test_cpu_pool
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_ARGS ?=
SHARED     ?= $(abspath ../shared)

.PHONY: all deps build asan tsan test test-fast test-asan test-tsan fuzz fuzz-ci demo clean help

all: build

help:
	@echo "make demo       - install deps, build, run the demo"
	@echo "make test       - install deps, build, run all tests (release + ASan/UBSan builds)"
	@echo "make test-fast  - release build tests only"
	@echo "make build      - configure and build into $(BUILD)/"
	@echo "make test-tsan  - ThreadSanitizer build (clang) of the threaded tests (not part of make test)"
	@echo "make fuzz       - build the libFuzzer targets (clang) and run each 60 s (scripts/fuzz.sh)"
	@echo "make fuzz-ci    - build the targets of the test suite's short fuzz run (part of make test-fast)"
	@echo "make clean      - remove build folders"

deps:
	@bash scripts/deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DKVM_SHARED_DIR=$(SHARED) $(CMAKE_ARGS) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

asan: deps
	@cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DKVM_SANITIZE=ON -DKVM_CUDA=OFF -DKVM_SHARED_DIR=$(SHARED) $(CMAKE_ARGS) >/dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS)

test-fast: build fuzz-ci
	@bash scripts/fetch-tokenizers.sh || true
	@cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# the libFuzzer targets of the release suite's short run (tests/cli/fuzz_short.sh), built here with the test's own
# settings so that the test finds them built (a compile is no test); without clang the test says why it skips
fuzz-ci: build
	@CC=clang KVM_SHARED_DIR=$(SHARED) JOBS=$(JOBS) bash scripts/fuzz.sh --build $(BUILD)/fuzz-ci --opt -O0 --build-only \
	  || echo "fuzz targets not built here (the short run in the tests will say why)"

test-asan: asan
	@cd $(ASAN_BUILD) && KVM_SANITIZED=1 ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j $(JOBS)

# ThreadSanitizer (clang): tests/tsan.supp says what is suppressed and why. Not in `make test` (its build would
# exceed CI's time budget).
tsan: deps
	@cmake -S . -B $(TSAN_BUILD) -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Debug -DKVM_TSAN=ON -DKVM_CUDA=OFF -DKVM_SHARED_DIR=$(SHARED) $(CMAKE_ARGS) >/dev/null
	@cmake --build $(TSAN_BUILD) -j $(JOBS)

test-tsan: tsan
	@cd $(TSAN_BUILD) && KVM_SANITIZED=1 TSAN_OPTIONS="suppressions=$(abspath tests/tsan.supp)" \
	  ctest --output-on-failure -j $(JOBS) -R '^($(TSAN_TESTS))$$'

fuzz: deps
	@bash scripts/fuzz.sh --time $${FUZZ_SECONDS:-60}

test: test-fast test-asan

demo: build
	@bash scripts/demo.sh $(BUILD)/kvmesh $(SHARED)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) build-fuzz
