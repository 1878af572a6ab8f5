# `make demo` and `make test` each set up everything they need on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
EXT    := build/.extension
CSRC   := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
DATA   ?= ../shared/data/cifar10

.PHONY: install extension demo test test-slow test-isa reference-model bench gpu-check gpu-wheels clean

install: $(EXT)

# The Python package (editable); the native extension is built by the next rule.
$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -c constraints.txt "setuptools>=70" wheel ninja
	VMQ_NO_EXTENSION=1 $(PIP) install --quiet --no-build-isolation -c constraints.txt -e ".[test]"
	touch $(STAMP)

# vmq._C from csrc/ (CPU kernels; CUDA kernels too where torch is a CUDA build and nvcc is found),
# rebuilt incrementally when a source changes. Its stamp lies in build/, beside the objects, so that
# whatever removes the build (git clean, make clean) also makes the next make rebuild vmq._C.
$(EXT): $(STAMP) $(CSRC)
	$(PY) setup.py --quiet build_ext --inplace
	mkdir -p build && touch $(EXT)

extension: $(EXT)

# The main job: quantize the shipped reference model (PTQ4VM W4A8) and evaluate the packed file.
demo: install
	$(VENV)/bin/vmq env
	mkdir -p runs/demo
	$(VENV)/bin/vmq quantize --recipe configs/w4a8.yaml --out runs/demo/vim_ref_cifar10-w4a8.safetensors
	$(VENV)/bin/vmq eval runs/demo/vim_ref_cifar10-w4a8.safetensors

test: install
	$(PY) -m pytest -q tests

# The README's accuracy claims, rerun with the default recipes on the reference model (slow).
test-slow: install
	$(PY) -m pytest -q --run-slow -m slow tests

# The CPU kernels' other code paths: AVX2 without AVX-512 (x86-64-v3) and the compiler's portable
# target, each built (CPU kernels only) in a scratch copy and held to the twins by the kernel tests.
ISA_ARCHS ?= x86-64-v3 portable
test-isa: install
	@set -e; trap 'rm -rf "$$dir"' EXIT; for arch in $(ISA_ARCHS); do \
	  dir=$$(mktemp -d); \
	  cp -r setup.py README.md pytest.ini vmq csrc tests "$$dir"/; rm -f "$$dir"/vmq/_C*.so; \
	  (cd "$$dir" && VMQ_BUILD_CUDA=0 VMQ_CPU_ARCH=$$arch $(CURDIR)/$(PY) setup.py build_ext --inplace \
	    > build.log 2>&1 || { tail -20 build.log; exit 1; }); \
	  cd "$$dir"; export PYTHONPATH="$$dir" VMQ_REQUIRE_NATIVE=1 VMQ_BUILD_CUDA=0 VMQ_EXPECT_ROOT="$$dir"; \
	  $(CURDIR)/$(PY) -c "from vmq.ops import _library as L; isa = L.NATIVE.cpu_isa; \
	    print('test-isa: -march=$$arch, int8 path', isa); \
	    assert isa == {'x86-64-v3': 'avx2', 'portable': 'generic'}.get('$$arch', isa), 'unexpected int8 path'"; \
	  $(CURDIR)/$(PY) -m pytest -q -p no:cacheprovider tests/test_kernels.py; \
	  cd $(CURDIR); rm -rf "$$dir"; \
	done

# Retrain a shipped reference model (CPU, resumable; see vmq/assets/MODEL_CARD.md):
# MODEL=vim_ref_cifar10 (default) or MODEL=vmamba_ref_cifar10 (EPOCHS: the schedule it shipped with).
MODEL  ?= vim_ref_cifar10
EPOCHS ?= $(if $(filter vmamba_ref_cifar10,$(MODEL)),30,8)
WARMUP ?= $(if $(filter vmamba_ref_cifar10,$(MODEL)),1,0.5)
reference-model: install
	$(PY) scripts/train_reference.py --data $(DATA) --out runs/reference/$(MODEL) --model $(MODEL) \
	  --epochs $(EPOCHS) --warmup-epochs $(WARMUP)
	cp runs/reference/$(MODEL)/model.safetensors vmq/assets/$(MODEL).safetensors
	$(PY) scripts/model_card.py runs/reference/$(MODEL)/metrics.json vmq/assets

bench: install
	$(PY) benchmarks/eval_throughput.py
	$(PY) benchmarks/ptq_table.py

# One prepared check on a GPU machine (build in place with that machine's torch, GPU tests, sanitizers,
# kernel benchmarks, end to end; logs in OUT, at most 7 files). Without a GPU it prints its plan.
OUT ?= runs/gpu-check
gpu-check:
	$(PYTHON) scripts/gpu_check.py $(OUT)

# The packages vmq needs that the GPU image lacks, as wheels for its Python 3.12 (carried in .whl/;
# gpu-check installs them into a scratch folder): pydantic and its dependencies.
GPU_WHEELS ?= pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
              typing-extensions==4.16.0
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)
	ls .whl

clean:
	rm -rf $(VENV) build *.egg-info runs
