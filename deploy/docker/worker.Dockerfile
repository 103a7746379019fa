# syntax=docker/dockerfile:1
# A Python worker: the infergate-worker SDK with the example models (MiniLM
# embeddings, echo; add your own package the same way). The gRPC stubs are
# generated from proto/ while the wheel builds. Build context: the repository root.
#   docker build -f deploy/docker/worker.Dockerfile -t infergate-worker .

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY proto proto
COPY python-worker python-worker
RUN pip install --no-cache-dir "setuptools>=68" "grpcio-tools==1.85.1" wheel \
    && pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels ./python-worker

FROM python:3.11-slim-bookworm
# CPU wheels of PyTorch: a fraction of the CUDA build's size. For GPUs, start
# from a CUDA base image and drop the index URL.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"
COPY --from=build /wheels /wheels
RUN whl=$(ls /wheels/*.whl) && pip install --no-cache-dir "${whl}[minilm]" && rm -rf /wheels
ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 50051
HEALTHCHECK --interval=5s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-m", "infergate_worker", "health", "127.0.0.1:50051"]
ENTRYPOINT ["python", "-m", "infergate_worker", "serve"]
CMD ["infergate_worker.examples.minilm:MiniLM", "infergate_worker.examples.echo:Echo", "--listen", "0.0.0.0:50051"]
