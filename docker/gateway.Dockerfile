# The ltrec gRPC gateway (server/) on the core it shares with training (ltrec_core/): no torch,
# no ltrec package. Build it with `make image` (tools/image.py): it downloads the wheels of
# requirements/base.txt (and grpcio-tools for the stubs) into build/wheels/ on the host, which the
# build installs offline, and picks the base:
#   podman build -f docker/gateway.Dockerfile --ignorefile docker/gateway.Dockerfile.dockerignore \
#     --build-arg BASE=localhost/debian-python:bookworm -t localhost/ltrec-gateway:dev .
# BASE is any image with Python 3.11 and `python3 -m venv` (the public python:3.11-slim by
# default, or one made from Debian bookworm's packages where no registry can be reached).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY build/wheels/ /wheels/
# The stubs' compiler in a venv of its own (not shipped); its pip also fills the runtime venv,
# which so carries no pip. Only the host's wheels are used (--no-index): the build needs no index.
RUN python3 -m venv /opt/protoc \
 && /opt/protoc/bin/pip install -q --no-index --find-links /wheels grpcio-tools \
 && python3 -m venv --without-pip /opt/ltrec
COPY requirements/base.txt /tmp/base.txt
RUN /opt/protoc/bin/pip --python /opt/ltrec/bin/python install -q --no-index --find-links /wheels \
      -r /tmp/base.txt
WORKDIR /src
COPY proto/ proto/
# Stubs are generated at build time (they are not committed; see `make proto`).
RUN mkdir -p server/gen \
 && /opt/protoc/bin/python -m grpc_tools.protoc -Iserver/gen=proto --python_out=. \
      --grpc_python_out=. proto/ltrec/v1/recommender.proto

FROM ${BASE}
RUN groupadd --system --gid 10001 ltrec \
 && useradd --system --uid 10001 --gid ltrec --no-create-home --shell /usr/sbin/nologin ltrec
ENV PATH=/opt/ltrec/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/ltrec/ /opt/ltrec/
WORKDIR /app
COPY ltrec_core/ ltrec_core/
COPY server/ server/
COPY --from=build /src/server/gen/ server/gen/
USER 10001:10001
# gRPC and Prometheus metrics; the chart sets LTREC_MODEL_REPOSITORY and LTREC_TRITON_URL.
EXPOSE 50051 9100
ENV LTREC_MODEL_REPOSITORY=/models
CMD ["python", "-m", "server"]
