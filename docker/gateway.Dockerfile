# The ltrec gRPC gateway (server/) on the core it shares with training (ltrec_core/): no torch,
# no ltrec package. Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t ghcr.io/ltrec/ltrec-gateway:0.1.0 .
# Stubs are generated at build time (they are not committed; see `make proto`).

FROM python:3.11-slim AS stubs
WORKDIR /src
# Same version as requirements/dev.txt, matching grpcio in requirements/base.txt.
RUN pip install --no-cache-dir grpcio-tools==1.81.1
COPY proto/ proto/
RUN mkdir -p server/gen \
 && python -m grpc_tools.protoc -Iserver/gen=proto --python_out=. --grpc_python_out=. \
      proto/ltrec/v1/recommender.proto

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements/base.txt requirements/base.txt
RUN pip install -r requirements/base.txt
COPY proto/ proto/
COPY ltrec_core/ ltrec_core/
COPY server/ server/
COPY --from=stubs /src/server/gen/ server/gen/
RUN groupadd --system --gid 10001 ltrec \
 && useradd --system --uid 10001 --gid ltrec --no-create-home --shell /usr/sbin/nologin ltrec
USER 10001:10001
# gRPC and Prometheus metrics; the chart sets LTREC_MODEL_REPOSITORY and LTREC_TRITON_URL.
EXPOSE 50051 9100
ENV LTREC_MODEL_REPOSITORY=/models
CMD ["python", "-m", "server"]
