# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test venv clean browser

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/tunelab demo

# The web page's browser test drives Debian's Chromium; installed where this machine lets us (root + apt),
# else that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get install -y -q chromium >/dev/null 2>&1 || echo "chromium not installed: the browser test will skip"; }

test: venv browser
	$(PY) -m pytest -q

# Training throughput of the usual recipe, TRL and tunelab on 2 CPU cores; writes bench/results.json.
.PHONY: bench
$(VENV)/.installed-bench: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e ".[bench]"
	touch $@

bench: $(VENV)/.installed-bench
	$(PY) bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

# Realistic bugs put into a scratch copy of src/, one at a time; fails if the tests let one through.
.PHONY: mutation
mutation: venv
	$(PY) scripts/mutation.py $(MUTATION_ARGS)

# The GPU benchmark: tunelab vs the usual recipe vs TRL on Qwen2.5-0.5B/7B shapes in bf16 (bench/gpu.py's docstring
# says what is measured); writes bench/gpu_results.json. On a CPU: make bench-gpu BENCH_GPU_ARGS=--smoke
.PHONY: bench-gpu
bench-gpu: $(VENV)/.installed-bench
	$(PY) bench/gpu.py $(BENCH_GPU_ARGS)
