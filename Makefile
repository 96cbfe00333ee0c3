# `make test` and `make demo` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test test-all setup demo clean

setup: $(VENV)/.installed

# Re-install when the dependencies change.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

# The demo: a real ablation (sweeps/demo.yaml) on the bundled digits, SQLite storage, TensorBoard logs,
# then the table and plots. Run it again and it resumes: finished cells are not trained twice (a failed
# cell stops it before the table: `dat-lab sweep` exits 1; running it again retries that cell).
demo: setup
	$(VENV)/bin/dat-lab sweep sweeps/demo.yaml
	$(VENV)/bin/dat-lab analyze demo --out runs/demo/analysis
	@echo
	@echo "Report:       runs/demo/analysis/report.md"
	@echo "TensorBoard:  $(VENV)/bin/tensorboard --logdir runs/demo"
	@echo "Optuna:       $(VENV)/bin/optuna-dashboard sqlite:///runs/demo.db"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
