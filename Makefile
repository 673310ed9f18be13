# The two set-up commands of the README: `make demo` and `make test` (ruff, then pytest; the docs site is
# built with `mkdocs build --strict` by tests/test_docs.py).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.torch_qode-installed

.PHONY: demo test bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[recipes,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m recipes.demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
