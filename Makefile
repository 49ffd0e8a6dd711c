# intrain: make install | make test | make bench
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test bench clean

install: $(STAMP)

# torch and torchvision first: pip takes these pinned releases from the machine's local
# wheels, so no later dependency can pull another torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<27"
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 2 tests

bench: install
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) .pytest_cache
