# Two commands do everything on a fresh machine:  make reproduce  (the paper's figures)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
SCALE  ?= default
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888
# jupyter refuses to start as root without --allow-root (containers, cloud VMs)
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
BIN    := $(VENV)/bin
READY  := $(VENV)/.nvmlib-installed

.PHONY: setup lint test reproduce lab bench probe docs clean

setup: $(READY)

$(READY): pyproject.toml constraints.txt scripts/system-deps.sh
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt "$(TORCH)" -e ".[notebooks,zarr,lightning,hf,test,docs]"
	touch $@

# ruff: pyflakes, bugbear, import order, lines of at most 100 characters (pyproject.toml)
lint: $(READY)
	$(BIN)/ruff check .

test: $(READY)
	$(BIN)/python -m pytest -q --durations=12

reproduce: $(READY)
	$(BIN)/nvmlib reproduce --scale $(SCALE)

# the notebooks folder opens in the lab's file browser; a browser window only where there is a display
lab: $(READY)
	@echo "make lab: JupyterLab serves this checkout; open the http://$(LAB_IP):... URL with its token printed below (Ctrl-C stops it)"
	$(BIN)/jupyter lab --ServerApp.root_dir=. --ip=$(LAB_IP) --port=$(LAB_PORT) $(ROOT_FLAG) \
		$(if $(DISPLAY),,--no-browser) --LabApp.default_url=/lab/tree/notebooks

bench: $(READY)
	$(BIN)/python benchmarks/bench_swag.py $(BENCH_DIR)
	$(BIN)/python benchmarks/bench_pmem.py $(BENCH_DIR)

# the documentation site, offline, into site/ (open site/index.html)
docs: $(READY)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

probe: $(READY)
	$(BIN)/nvmlib probe $(PROBE_PATH)

clean:
	rm -rf $(VENV) results/*.ipynb results/scratch .pytest_cache site
