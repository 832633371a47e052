# The two Quick-start commands (README): `make demo` and `make test`. Both install what is missing first
# (scripts/setup.sh is idempotent), then configure and build with CMake presets.
PRESET ?= release
BUILD := build/$(PRESET)
JOBS ?= $(shell nproc)

.PHONY: all setup build demo test bench clean

all: build

setup:
	bash scripts/setup.sh

build: setup
	cmake --preset $(PRESET)
	cmake --build --preset $(PRESET) -j $(JOBS)

demo: build
	$(BUILD)/core/mqa-demo

test: build
	ctest --preset $(PRESET) -j 2

bench: build
	.venv/bin/python bench/run_layer_bench.py --build $(BUILD)

clean:
	rm -rf build
