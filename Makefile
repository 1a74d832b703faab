# kvmesh - thin wrapper over CMake. The two commands a new user needs:
#   make demo   install missing packages, build, run the main demo
#   make test   install missing packages, build, run every test (plus the ASan+UBSan build of the tests)
BUILD      ?= build
ASAN_BUILD ?= build-asan
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_ARGS ?=
SHARED     ?= $(abspath ../shared)

.PHONY: all deps build asan test test-fast test-asan demo clean help

all: build

help:
	@echo "make demo       - install deps, build, run the demo"
	@echo "make test       - install deps, build, run all tests (release + ASan/UBSan builds)"
	@echo "make test-fast  - release build tests only"
	@echo "make build      - configure and build into $(BUILD)/"
	@echo "make clean      - remove build folders"

deps:
	@bash scripts/deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DKVM_SHARED_DIR=$(SHARED) $(CMAKE_ARGS) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

asan: deps
	@cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DKVM_SANITIZE=ON -DKVM_CUDA=OFF -DKVM_SHARED_DIR=$(SHARED) $(CMAKE_ARGS) >/dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS)

test-fast: build
	@bash scripts/fetch-tokenizers.sh || true
	@cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

test-asan: asan
	@cd $(ASAN_BUILD) && KVM_SANITIZED=1 ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j $(JOBS)

test: test-fast test-asan

demo: build
	@bash scripts/demo.sh $(BUILD)/kvmesh $(SHARED)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
