# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=

.PHONY: demo test test-all lint install browser clean bench docs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, alone: pip takes this exact pair from the machine's local wheels
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pneumoscope demo $(if $(DATA),--data $(DATA))

# The browser tests need Debian's chromium: installed here where we can (as root, with apt-get), else the run ends
# with a NOT TESTED line naming the command that makes them run.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && echo "installing Debian's chromium for the browser tests" && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	echo "no chromium, and it cannot be installed here: the browser tests will be skipped (sudo apt-get install chromium)"

# the quick suite, for every change; test-all adds the long integration tests (marked slow) and is what CI runs.
# Both start with the formatter and the linter (ruff, pinned in the test extra): a few seconds.
test: $(STAMP) browser lint
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) browser lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff format --check --quiet src tests benchmarks docs/*.py
	$(VENV)/bin/ruff check --quiet src tests benchmarks docs/*.py

# the documentation site (docs/, mkdocs.yml) into build/site; --strict: a broken link or an unreadable docstring fails it.
# NO_MKDOCS_2_WARNING: Material's banner about MkDocs 2, printed on every build otherwise.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d build/site

bench: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py $(if $(DATA),--data $(DATA))
	$(PY) benchmarks/bench_recipe.py --name frozen-default $(if $(DATA),--data $(DATA))

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
