# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Every dependency at the version CI tested (`make constraints` refreshes it); empty = the newest releases
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: demo test test-fast test-latest lint venv clean browser constraints

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(PIN) -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/tunelab demo

# SFT then DPO of a tiny model on a style preference (examples/data/style_*): held-out pref_accuracy before and
# after, chat answers, and the time of each stage. One thread: a model this small gains little from two, and two
# threads on 2 cores that also run anything else wait on each other (measured: 0.07 s a step with one, 0.5-3 s
# with two); DEMO_THREADS= leaves torch's choice
DEMO_THREADS ?= 1
.PHONY: demo-dpo
demo-dpo: venv
	$(if $(DEMO_THREADS),OMP_NUM_THREADS=$(DEMO_THREADS)) $(VENV)/bin/tunelab demo --stage dpo

# The web page's browser test drives Debian's Chromium. As root with apt, this installs the `chromium` package
# (about 300 MB) once; otherwise, or with NO_BROWSER=1, the browser tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || [ -n "$(NO_BROWSER)" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the web page's browser test (NO_BROWSER=1 skips it)"; \
	    apt-get install -y -q chromium >/dev/null 2>&1 || echo "chromium not installed: the browser test will skip"; \
	  else echo "chromium absent and no root/apt: the browser test will skip"; fi; }

test: venv browser
	$(PY) -m pytest -q

# Pure units only (no training run, subprocess, browser or torchrun): under 2 minutes on 2 cores
test-fast: venv
	$(PY) -m pytest -q -m fast

lint: venv
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy

# The newest release of every dependency, in a venv of its own: meets a new peft or transformers on purpose
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# Refresh constraints.txt from the newest releases (torch stays TORCH_SPEC's, installed first)
constraints:
	rm -rf .venv-pins
	$(PYTHON) -m venv .venv-pins
	.venv-pins/bin/python -m pip install -q --upgrade pip
	.venv-pins/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-pins/bin/python -m pip install -q -e ".[test,bench]"
	{ echo "# make constraints: every dependency CI installs, at the version it was tested with"; \
	  .venv-pins/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|pip|setuptools|wheel)=='; } \
	  > constraints.txt
	rm -rf .venv-pins

# Training throughput of the usual recipe, TRL and tunelab on 2 CPU cores; writes bench/results.json.
.PHONY: bench
$(VENV)/.installed-bench: $(VENV)/.installed pyproject.toml
	$(PIP) install -q $(PIN) -e ".[bench]"
	touch $@

bench: $(VENV)/.installed-bench
	$(PY) bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-latest build src/*.egg-info .pytest_cache

# Realistic bugs put into a scratch copy of src/, one at a time; fails if the tests let one through.
.PHONY: mutation
mutation: venv
	$(PY) scripts/mutation.py $(MUTATION_ARGS)

# The GPU benchmark: tunelab vs the usual recipe vs TRL on Qwen2.5-0.5B/7B shapes in bf16 (bench/gpu.py's docstring
# says what is measured); writes bench/gpu_results.json. On a CPU: make bench-gpu BENCH_GPU_ARGS=--smoke
.PHONY: bench-gpu
bench-gpu: $(VENV)/.installed-bench
	$(PY) bench/gpu.py $(BENCH_GPU_ARGS)
