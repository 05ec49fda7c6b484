# The two commands of the README (run them inside a fresh virtual environment, as CI does):
#   make book   set up (install) and build the book: execute every chapter (build/chapters), then the offline
#               website (build/site/index.html: Sphinx + MyST-NB, sources in site/)
#   make test   set up (install) and run every test: library tests + every notebook under nbval
# and the lower-bounds check CI also runs (in another fresh environment):
#   make test-floor   install every dependency at the lower bound pyproject.toml states, run the fast library tests
PYTHON ?= python
# A CPU wheel of torch 2.13 is installed first (on these machines a local file; elsewhere PyPI's wheel
# for your platform). Installing torch later through the package's dependencies could pull CUDA builds.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup book test test-floor test-lib test-notebooks clean

setup:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[test,book,peft]"

book: setup
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) tools/build_book.py

test: setup
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest tests chapters --nbval-lax --nbval-cell-timeout=1200 \
		-p no:cacheprovider --durations=15 $(PYTEST_ARGS)

test-floor:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -c .ci/lower-bounds.txt -e ".[test]"
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest tests -m "not slow" -q -p no:cacheprovider -n 2 $(PYTEST_ARGS)

# quicker loops while writing
test-lib:
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest tests -m "not slow" -q $(PYTEST_ARGS)

test-notebooks:
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest chapters --nbval-lax --nbval-cell-timeout=1200 -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf build .ci-cache .ci-venv .ci-venv-floor
