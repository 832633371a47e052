# mqa-server image, two variants from one file (no Docker engine in CI: tests/deploy/check_deploy.py lints this
# file with hadolint; nothing builds it there):
#
#   docker build -t mqa-server:cuda .                          # default: CUDA 13, for the GPU nodes
#   docker build --build-arg VARIANT=cpu -t mqa-server:cpu .   # Debian 12, CPU only
#
# The build stage runs the same scripts as CI (scripts/setup.sh, scripts/build.sh), then gathers the binaries and
# the shared libraries they load into /opt/mqa (scripts/bundle_runtime.sh). The runtime stage is a slim base with
# only /opt/mqa and a non-root user. docs/operations.md explains deployment, draining and tuning.

ARG VARIANT=cuda
# The CUDA build stage is Ubuntu 24.04 (the CUDA images' OS); scripts/setup.sh installs the same package names
# there as on Debian 12. The runtime stage needs no CUDA toolkit libraries beyond what the PyTorch wheel brings
# (cuBLAS, cuDNN, the CUDA runtime: bundled under /opt/mqa/python/nvidia), so the small "base" image suffices; it
# still sets NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES for the NVIDIA container toolkit.
ARG CUDA_BUILD_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG CPU_BUILD_IMAGE=debian:12
ARG CPU_RUNTIME_IMAGE=debian:12-slim

FROM ${CUDA_BUILD_IMAGE} AS build-cuda
FROM ${CPU_BUILD_IMAGE} AS build-cpu
FROM ${CUDA_RUNTIME_IMAGE} AS runtime-cuda
FROM ${CPU_RUNTIME_IMAGE} AS runtime-cpu

# ---- build stage --------------------------------------------------------------------------------------------------
# DL3006 (untagged image): build-${VARIANT} is one of the stages above, whose base images are tagged.
# hadolint ignore=DL3006
FROM build-${VARIANT} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3008 (unpinned apt package): pip needs CA certificates before setup.sh runs; the package's version follows
# the base image's release (Debian 12 or Ubuntu 24.04, fixed by the image tags above), so no single version pin
# serves both variants.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Tests and benchmarks are CI's job (scripts/test.sh); the image installs and builds only what the server and the
# CLI need (the demo profile of both scripts). The CPU variant's Debian 12 has no CUDA toolkit: the build then
# leaves the project's CUDA code out and takes the CUDA runtime from the PyTorch wheel (CMakeLists.txt).
RUN bash scripts/setup.sh demo \
 && bash scripts/build.sh demo \
 && bash scripts/bundle_runtime.sh build/release /opt/mqa

# ---- runtime stage ------------------------------------------------------------------------------------------------
# DL3006 (untagged image): runtime-${VARIANT} is one of the stages above, whose base images are tagged.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="mqa-server" \
      org.opencontainers.image.description="Multi-Query Attention layers served over gRPC (variant: ${VARIANT})" \
      org.opencontainers.image.source="https://example.invalid/mqaserve"
COPY --from=build /opt/mqa /opt/mqa
# A fixed numeric id, so Kubernetes' runAsNonRoot can check it (deploy/k8s/deployment.yaml runs as 10001 too).
RUN groupadd --system --gid 10001 mqa \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mqa
# LD_LIBRARY_PATH: the bundle (scripts/bundle_runtime.sh), then where the NVIDIA container toolkit may mount the
# driver on older set-ups (the CUDA base image's own setting). Every MQA_* value is a default a flag, the config
# file (--config / MQA_CONFIG) or the orchestrator's environment may override.
ENV PATH=/opt/mqa/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/opt/mqa/lib:/opt/mqa/python/torch/lib:/opt/mqa/python/nvidia/cu13/lib:/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    MQA_LISTEN=0.0.0.0:50051 \
    MQA_HEALTH_LISTEN=0.0.0.0:50052 \
    MQA_METRICS_LISTEN=0.0.0.0:9400 \
    MQA_LOG_FORMAT=json \
    MQA_DRAIN_TIMEOUT_MS=30000 \
    MQA_TARGET=127.0.0.1:50051
USER 10001:10001
WORKDIR /opt/mqa
# 50051: the gRPC service; 50052: plaintext gRPC health (Kubernetes' grpc probes); 9400: Prometheus /metrics.
EXPOSE 50051 50052 9400
# Model loading can take minutes on a large model, hence the long start period; mqa-cli exits non-zero unless the
# server answers SERVING (it answers NOT_SERVING while draining).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
  CMD ["mqa-cli", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["mqa-server"]
