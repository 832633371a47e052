# CPU image of the current state (the layer demo). The issue "Deployment and operations" turns this into the
# multi-stage CUDA + LibTorch build with a slim runtime stage. It calls the same set-up script CI runs.
FROM debian:12
RUN apt-get update && apt-get install -y --no-install-recommends make ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN bash scripts/setup.sh && cmake --preset release && cmake --build --preset release
CMD ["build/release/core/mqa-demo"]
