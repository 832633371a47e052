# CPU image of the current state: mqa-server with the embedded default model on port 50051. The issue "Deployment and operations" turns this into the
# multi-stage CUDA + LibTorch build with a slim runtime stage. It calls the same set-up script CI runs.
FROM debian:12
RUN apt-get update && apt-get install -y --no-install-recommends make ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN bash scripts/setup.sh && cmake --preset release && cmake --build --preset release
EXPOSE 50051
CMD ["build/release/server/mqa-server", "--listen", "0.0.0.0:50051"]
