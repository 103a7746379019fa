"""Models used by the SDK tests (imported by worker subprocesses)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc

from infergate.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from infergate_worker import Cancelled, Embeddings, InvalidInput, Model, current_context


class SlowLoad(Model):
    """Loads only once the file named by SLOWLOAD_GATE exists."""

    name = "slowload"
    kind = "embed"
    max_batch_size = 4
    embedding_dim = 2

    def load(self) -> None:
        gate = Path(os.environ["SLOWLOAD_GATE"])
        while not gate.exists():
            time.sleep(0.02)

    def embed(self, texts: list[str]) -> list:
        out: list = []
        for t in texts:
            if t == "bad":
                out.append(InvalidInput("'bad' is not allowed"))
            elif t == "boom":
                out.append(RuntimeError("exploded"))
            else:
                out.append([float(len(t)), 1.0])
        return out


class Vectors(Model):
    """numpy vectors with token counts, two texts a batch; "fail" fails its batch."""

    name = "vectors"
    kind = "embed"
    max_batch_size = 2
    embedding_dim = 2

    def embed(self, texts: list[str]) -> Embeddings:
        import numpy as np

        if "fail" in texts:
            raise ValueError("asked to fail")
        rows = np.array([[float(len(t)), 0.0] for t in texts], dtype=np.float64)
        return Embeddings(rows, tokens=[len(t) for t in texts])


class Patient(Model):
    """Waits; writes a marker file when it sees its call end early."""

    name = "patient"
    kind = "embed"
    embedding_dim = 1

    def embed(self, texts: list[str]) -> list:
        ctx = current_context()
        try:
            ctx.wait(10)
        except Cancelled as exc:
            Path(os.environ["PATIENT_MARKER"]).write_text(f"{exc.reason} {ctx.request_id}")
            raise
        return [[1.0] for _ in texts]


class RawWorker(worker_pb2_grpc.WorkerServicer):
    """A hand-written servicer, no SDK Model involved."""

    def Describe(self, request, context):
        info = types_pb2.ModelInfo(name="raw", kind=types_pb2.MODEL_KIND_EMBED, max_batch_size=8)
        return worker_pb2.DescribeResponse(models=[info])

    def Embed(self, request, context):
        if request.model != "raw":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        results = [
            worker_pb2.EmbedResult(embedding=types_pb2.Embedding(values=[float(len(t))]))
            for t in request.texts
        ]
        return worker_pb2.EmbedBatchResponse(results=results)


class BrokenLoad(Model):
    """A model whose ``load()`` raises, as one with missing weights does."""

    name = "broken"

    def load(self) -> None:
        raise FileNotFoundError("weights.bin: no such file\nsecond line")


NOT_A_MODEL = {"weights": "weights.bin"}


class Sleeper(Model):
    """Blocks in time.sleep, never asking its context whether to stop."""

    name = "sleeper"

    def infer(self, items: list) -> list:
        time.sleep(2.5)
        return [{} for _ in items]
