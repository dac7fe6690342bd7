# Two commands do all the set-up on a fresh machine:
#   make demo   - create the environment, run the main job (search -> export -> report) on the
#                 embedded default; without a GPU the kernels run in Triton's interpreter on the
#                 tiny shape set (timings are interpreter timings, and the output says so)
#   make test   - create the environment and run the test suite (CPU; kernels in the interpreter)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# Without CUDA, kernels run in Triton's interpreter.
ifeq ($(HAS_CUDA),1)
  RUNENV :=
  SHAPES ?= mom-340m-prefill
else
  RUNENV := TRITON_INTERPRET=1
  SHAPES ?= tiny
endif
TRIALS ?= 6

.PHONY: setup demo test test-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# without CUDA take the CPU build of torch first (a bare `torch` would pull a multi-GB CUDA build)
	$(if $(HAS_CUDA),,$(BIN)/pip install -q torch==2.13.0)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	@mkdir -p $(OUT)
	$(RUNENV) $(BIN)/momtune search --template all --shapes $(SHAPES) --trials $(TRIALS) --storage sqlite:///$(abspath $(OUT))/momtune.db
	$(RUNENV) $(BIN)/momtune export --storage sqlite:///$(abspath $(OUT))/momtune.db --out $(OUT)/library.json
	$(RUNENV) $(BIN)/momtune report --storage sqlite:///$(abspath $(OUT))/momtune.db --library $(OUT)/library.json --out $(OUT)/report

test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu"

# On a CUDA machine (the H100): the GPU-marked tests over the real shape sets.
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
