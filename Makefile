# Two commands do everything on a fresh machine:  make reproduce  (the paper's figures)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
SCALE  ?= default
BIN    := $(VENV)/bin
READY  := $(VENV)/.nvmlib-installed

.PHONY: setup test reproduce lab bench probe clean

setup: $(READY)

$(READY): pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[notebooks,zarr,test]"
	touch $@

test: $(READY)
	$(BIN)/python -m pytest -q

reproduce: $(READY)
	$(BIN)/nvmlib reproduce --scale $(SCALE)

lab: $(READY)
	$(BIN)/jupyter lab notebooks/

bench: $(READY)
	$(BIN)/python benchmarks/bench_swag.py $(BENCH_DIR)
	$(BIN)/python benchmarks/bench_pmem.py $(BENCH_DIR)

probe: $(READY)
	$(BIN)/nvmlib probe $(PROBE_PATH)

clean:
	rm -rf $(VENV) results/*.ipynb results/scratch .pytest_cache
