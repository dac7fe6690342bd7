# Two commands do all the set-up on a fresh machine:
#   make demo   - create the environment, run the main job (search -> export -> report) on the
#                 embedded default; without a GPU the kernels run in Triton's interpreter on the
#                 tiny shape set (timings are interpreter timings, and the output says so)
#   make test   - create the environment and run the test suite (CPU; kernels in the interpreter),
#                 then the compile gate: every template's kernels compiled for sm_90 and sm_80
#                 with the newest Triton (.venv) and with Triton 3.6.0 (the GPU machine's)
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
# Triton of the lent H200 (torch 2.11): installed beside the newest into .triton36 (triton alone,
# on PYTHONPATH in front of the venv's) for the compile gate
GATE_TRITON ?= 3.6.0
GATE_DIR    := .triton36

.PHONY: setup demo test test-gpu compile-gate gpu-smoke clean

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

$(GATE_DIR)/.installed: | setup
	rm -rf $(GATE_DIR)
	$(BIN)/pip install -q --no-deps --target $(GATE_DIR) triton==$(GATE_TRITON)
	touch $@

# Both gates run even if the tests fail; the target fails if any of the three did.
test: setup $(GATE_DIR)/.installed
	@st=0; \
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu" || st=1; \
	$(MAKE) --no-print-directory compile-gate || st=1; \
	exit $$st

# Every template's kernels compiled for sm_90 and sm_80 on the CPU (momtune/aot.py), with the
# venv's Triton and with $(GATE_TRITON); a kernel that does not compile fails with its template,
# config, shape, dtype, target and Triton version.
compile-gate: setup $(GATE_DIR)/.installed
	@st=0; \
	env -u TRITON_INTERPRET $(BIN)/python -m momtune.aot --jobs 2 || st=1; \
	env -u TRITON_INTERPRET PYTHONPATH=$(abspath $(GATE_DIR)) $(BIN)/python -m momtune.aot --jobs 2 || st=1; \
	exit $$st

# On a CUDA machine (the H100): the GPU-marked tests over the real shape sets.
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

# On a GPU machine, cold, in a few minutes: every template at a real shape in bf16, the fast layer
# (prefill, decode) and the fast LM (forward, generate; fla's logits if installed) against the
# reference, with a short table (bench/gpu_smoke.py).
gpu-smoke:
	python3 bench/gpu_smoke.py

clean:
	rm -rf $(VENV) $(OUT) $(GATE_DIR) .pytest_cache
