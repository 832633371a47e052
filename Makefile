# Shortcuts; the README's Quick start uses the scripts directly, since a fresh Debian 12 may lack make.
# setup-demo / setup-test: scripts/setup.sh's two profiles (the demo's and the Docker image's needs; the tests').
.PHONY: demo test bench debug no-cuda-check setup-demo setup-test clean
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench:
	bash scripts/setup.sh && bash scripts/build.sh && \
	  .venv/bin/python bench/run_layer_bench.py --build build/release
debug:
	bash scripts/setup.sh && cmake --preset debug && cmake --build --preset debug && ctest --preset debug -j 2
no-cuda-check:
	bash scripts/check_no_cuda_quickstart.sh
setup-demo:
	bash scripts/setup.sh demo
setup-test:
	bash scripts/setup.sh test
clean:
	rm -rf build
