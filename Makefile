# One-machine workflow. `make demo` sets everything up and runs the retraining DAG end
# to end on synthetic data; `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
ENV := source scripts/env.sh &&
CONF ?= {}

.PHONY: demo setup horovod run talkingdata test test-fast lint airflow-ui mlflow-ui bench clean

demo: setup run

setup: $(VENV)/.installed .airflow/airflow.db

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

.airflow/airflow.db: $(VENV)/.installed
	$(ENV) mkdir -p "$$AIRFLOW_HOME" && airflow db migrate > "$$AIRFLOW_HOME/migrate.log" 2>&1 \
		|| { tail -20 "$$AIRFLOW_HOME/migrate.log"; exit 1; }

# Horovod 0.28.1 needs a C++17 patch to build against torch 2.13 (about 5 minutes).
horovod: setup
	$(ENV) scripts/install_horovod.sh

run: setup
	$(ENV) scripts/run_dag.sh '$(CONF)'

talkingdata: setup
	$(ENV) scripts/run_dag.sh '{"source": "talkingdata", "input_path": "$(abspath ../shared/data/talkingdata/train_sample.csv)"}'

test: setup
	$(ENV) scripts/run_tests.sh

test-fast: setup
	$(ENV) python -m pytest -m "not slow" -q

lint: setup
	$(ENV) ruff check . && ruff format --check .

airflow-ui: setup
	$(ENV) airflow standalone

mlflow-ui: setup
	$(ENV) mlflow ui --backend-store-uri "sqlite:///$$ADFRAUD_HOME/mlflow.db" --host 127.0.0.1 --port 5000

bench: setup
	$(ENV) python bench/bench_generate.py && python bench/bench_train.py

clean:
	rm -rf var .airflow
