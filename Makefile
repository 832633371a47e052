# Shortcuts; the README's Quick start uses the scripts directly, since a fresh Debian 12 may lack make.
.PHONY: demo test bench debug clean
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench:
	bash scripts/setup.sh && cmake --preset release && cmake --build --preset release && \
	  .venv/bin/python bench/run_layer_bench.py --build build/release
debug:
	bash scripts/setup.sh && cmake --preset debug && cmake --build --preset debug && ctest --preset debug -j 2
clean:
	rm -rf build
