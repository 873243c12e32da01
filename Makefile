# ddl_apps: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
VENV ?= .venv
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup demo test test-fast lint bench

setup:
	bash scripts/setup.sh

# The main job: the fraud recipe on 2 Horovod workers over all 590,540 IEEE-CIS transactions, beside a
# gradient-boosting baseline; leaves runs/fraud_mlp-<time>/ with metrics, curves, checkpoints and the model.
demo: setup
	$(VENV)/bin/ddl train fraud_mlp -np 2

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d $${TMPDIR:-/tmp}/ddl_apps_site
	$(VENV)/bin/pytest -q -n 2 --durations=25

test-fast: setup
	$(VENV)/bin/pytest -q -n 2 -m "not distributed and not slow"

# The benchmarks (13 minutes on a 2-core Intel Xeon, about 25 on a slower 2-core machine, and about 35 more for the
# `data` part, which writes and deletes a 32 GiB table: 40 GB of free disk, 4 for `hosts`, which needs root, 4 for
# `zero`, whose workers need about 3 GiB each, and about 35 for `tabular`, the tabular recipes' quality on 6 tables):
# results in benchmarks/results/, tables and charts in BENCHMARKS.md.
bench: setup
	$(VENV)/bin/ddl bench

lint:
	$(VENV)/bin/ruff check .
