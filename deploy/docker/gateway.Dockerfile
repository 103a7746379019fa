# syntax=docker/dockerfile:1
# The gateway: built with the toolchain the project is tested with, run from
# a slim image as a non-root user. Build context: the repository root.
#   docker build -f deploy/docker/gateway.Dockerfile -t infergate-gateway .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml clippy.toml ./
COPY proto proto
COPY gateway gateway
# Workspace members: cargo reads their manifests even when building one package.
COPY tests tests
COPY benches benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    # No Python in this image: built without the embedded pool kind.
    cargo build --release --locked -p infergate --no-default-features \
    && install -D target/release/infergate /out/infergate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/infergate /usr/local/bin/infergate
USER 65532:65532
# REST (OpenAI-compatible /v1, Open Inference Protocol /v2, /metrics) and gRPC.
EXPOSE 8080 50051
ENTRYPOINT ["infergate"]
CMD ["serve", "--config", "/etc/infergate/gateway.toml"]
