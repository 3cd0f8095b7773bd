# batchgate container image: `batchgate serve` over a model repository mounted at /models.
#
# Build, from the repository root:
#   GPU (the default; CUDA runtime + onnxruntime-gpu):  docker build -t batchgate:gpu .
#   CPU only (plain Ubuntu + onnxruntime):              docker build --build-arg VARIANT=cpu -t batchgate:cpu .
#
# Run:
#   docker run --gpus all --stop-timeout 40 -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -v "$PWD/models:/models:ro" batchgate:gpu
#
# Model repository: mount a Triton-layout repository (one directory per model) at /models;
# read-only is enough. Nothing is baked in and no VOLUME is declared, so a forgotten mount
# stops the server at once with "model_repository '/models' is not a directory" instead of
# serving an empty anonymous volume. A gateway of remote models only sets
# BATCHGATE_MODEL_REPOSITORY= (empty) and passes --remote-model.
#
# Settings: every one is a BATCHGATE_<NAME> variable (-e BATCHGATE_LOG_FORMAT=json) or a flag
# appended after the image name (docker run ... batchgate:gpu --log-format json), flags winning.
# To list them: docker run --rm --entrypoint batchgate batchgate:cpu settings
#
# Ports: 8000 HTTP/REST, 8001 gRPC, 8002 Prometheus metrics. Change them with the
# BATCHGATE_*_PORT variables rather than flags: the health check reads BATCHGATE_HTTP_PORT.
#
# Shutdown: on SIGTERM batchgate stops accepting work and drains for up to exit_timeout_s
# (30 s by default). Docker kills after 10 s unless told otherwise, hence --stop-timeout 40
# above; in Kubernetes set terminationGracePeriodSeconds above exit_timeout_s.
#
# GPU: the model's config asks for CUDA with instance_group [{ kind: KIND_GPU }]. The default
# onnxruntime-gpu release is built for CUDA 13, which needs an NVIDIA driver of the R580
# series or newer. For older drivers, 1.26.0 is the last release built for CUDA 12:
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg ONNXRUNTIME_GPU_VERSION=1.26.0 -t batchgate:gpu-cuda12 .

# gpu or cpu: selects the operating-system stage and the virtual environment below.
ARG VARIANT=gpu
# A runtime image (CUDA and cuDNN libraries, no compilers) whose CUDA major version is the one
# ONNXRUNTIME_GPU_VERSION was built for.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# Must satisfy the `gpu` extra in pyproject.toml (tests/deploy checks it).
ARG ONNXRUNTIME_GPU_VERSION=1.31.1

# ---- operating systems: both Ubuntu 24.04, so both variants run the same python3 (3.12)
FROM ${CUDA_IMAGE} AS gpu-os
FROM ubuntu:24.04 AS cpu-os

# ---- the interpreter, shared by the builder and the final image
FROM ${VARIANT}-os AS python-runtime
# DL3008 (pin apt package versions): left unpinned on purpose. The base image tag already fixes
# the Ubuntu release; within it, the archive replaces a package version as soon as a security
# update ships and stops serving the old one, so an exact pin would break the build instead of
# making it reproducible. Rebuilding picks up those updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install --yes --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

# ---- builder: a virtual environment at /opt/venv holding batchgate and its dependencies.
# Every dependency ships binary wheels for CPython 3.12 on x86-64 Linux, so no compiler is
# installed here either; python3-venv only provides venv's bundled pip.
FROM python-runtime AS builder
# DL3008: unpinned for the same reason as python3 above.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install --yes --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY pyproject.toml setup.py README.md /src/
COPY proto /src/proto
COPY server /src/server
COPY converters /src/converters
COPY loadtest /src/loadtest
# The server's own dependencies, with the CPU onnxruntime, and the drift extra (river, scipy: the
# drift detector process); none of the other extras.
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "/src[drift]" \
    && /opt/venv/bin/batchgate --version

# The CPU variant's environment is the builder's, unchanged.
FROM builder AS cpu-venv

# The GPU variant swaps onnxruntime for onnxruntime-gpu. Both wheels install the same
# `onnxruntime` Python package, so they must never be installed together: the CPU one is
# removed first, then the GPU one is installed into the now empty place (installing it over
# the CPU one and uninstalling that afterwards would delete files the GPU one shares).
# The check fails the build if the CUDA provider is not in the installed onnxruntime; it does
# not need a GPU, the provider library is only loaded when a session asks for it.
FROM builder AS gpu-venv
ARG ONNXRUNTIME_GPU_VERSION
RUN /opt/venv/bin/pip uninstall --yes onnxruntime \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && /opt/venv/bin/python -c "import onnxruntime as o; p = o.get_available_providers(); assert 'CUDAExecutionProvider' in p, p"

# A fixed name for the chosen environment, for COPY --from below.
FROM ${VARIANT}-venv AS venv

# ---- the final image: interpreter + environment; no pip cache, no sources, no build tools
FROM python-runtime AS runtime
LABEL org.opencontainers.image.title="batchgate" \
      org.opencontainers.image.description="Open Inference Protocol (KServe V2 / Triton) gateway: gRPC + HTTP, ONNX Runtime, dynamic batching" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed, numeric, non-root uid/gid (10001), so that Kubernetes' runAsNonRoot can verify it
# and host directories can be granted to it. The application files stay owned by root:
# the server can read /opt/venv but not change it.
RUN groupadd --gid 10001 batchgate \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/batchgate \
        --shell /usr/sbin/nologin batchgate
COPY --from=venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BATCHGATE_MODEL_REPOSITORY=/models \
    BATCHGATE_HOST=0.0.0.0
WORKDIR /home/batchgate
USER 10001:10001
EXPOSE 8000 8001 8002
# Ready, not merely alive: /v2/health/ready answers 200 once the models are loaded and 400
# while the server drains. No curl in the image: batchgate.healthcheck asks, with the settings the
# BATCHGATE_* variables give (HTTPS when TLS is on; the plaintext health port when one is set,
# as mTLS needs), exit status 1 = unhealthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-m", "batchgate.healthcheck"]
# SIGTERM is Docker's default; stated because batchgate drains on it (see Shutdown above).
STOPSIGNAL SIGTERM
ENTRYPOINT ["batchgate", "serve"]
