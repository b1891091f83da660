# Two commands for a newcomer: `make demo` and `make test`. Both create/refresh .venv by themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $(STAMP)

venv: $(STAMP)

# a whole swarm on this machine (DHT, coordinator, peers, dashboard); Ctrl-C stops it. ARGS="--once" runs it and exits
demo: $(STAMP)
	$(VENV)/bin/swarm demo $(ARGS)

# PYTEST_ARGS narrows the run, e.g. make test PYTEST_ARGS="tests/test_demo.py -x"
test: $(STAMP)
	bash scripts/install_browser.sh $(VENV)
	$(PY) -m pytest $(or $(PYTEST_ARGS),tests) -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
