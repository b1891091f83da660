# Two commands for a newcomer: `make demo` and `make test`. Both create/refresh .venv by themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m cli.split_demo

test: $(STAMP)
	bash scripts/install_browser.sh $(VENV)
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
