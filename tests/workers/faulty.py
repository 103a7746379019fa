"""Workers that misbehave on purpose, for the gateway's fault scenarios.

Served with ``python -m infergate_worker serve faulty:Unavailable`` and
``PYTHONPATH`` pointing here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import grpc

from infergate.v1 import types_pb2, worker_pb2, worker_pb2_grpc


class Unavailable(worker_pb2_grpc.WorkerServicer):
    """Healthy by its health service, yet every call fails with UNAVAILABLE."""

    def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.ServicerContext
    ) -> worker_pb2.DescribeResponse:
        info = types_pb2.ModelInfo(
            name="broken",
            kind=types_pb2.MODEL_KIND_INFER,
            max_batch_size=1,
            version="1",
        )
        return worker_pb2.DescribeResponse(models=[info])

    def Infer(
        self, request: worker_pb2.InferBatchRequest, context: grpc.ServicerContext
    ) -> worker_pb2.InferBatchResponse:
        context.abort(grpc.StatusCode.UNAVAILABLE, "injected fault: always unavailable")


class Flaky(worker_pb2_grpc.WorkerServicer):
    """Echoes its input tensors (Infer) or the last message's words (Generate),
    except while the file named by the ``FAULTY_FLAG`` environment variable
    exists: then Infer fails at once with UNAVAILABLE (a worker that fails
    fast, then recovers when the test says) and Generate with
    RESOURCE_EXHAUSTED before any chunk (admission full: it never started).

    ``FAULTY_RATE`` (default 1) is the share of Infer calls that fail while
    flagged, spread evenly (0.5: every other call); ``FAULTY_DELAY`` seconds
    (default 0) slow every Infer call while flagged."""

    def __init__(self) -> None:
        self._flag = os.environ.get("FAULTY_FLAG", "")
        self._rate = float(os.environ.get("FAULTY_RATE", "1"))
        self._delay = float(os.environ.get("FAULTY_DELAY", "0"))
        self._calls = 0
        self._lock = threading.Lock()

    def _fails(self) -> bool:
        """Whether this flagged call fails: the ``FAULTY_RATE`` share of them."""
        with self._lock:
            self._calls += 1
            n = self._calls
        return int(n * self._rate) != int((n - 1) * self._rate)

    def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.ServicerContext
    ) -> worker_pb2.DescribeResponse:
        info = types_pb2.ModelInfo(
            name="flaky",
            kind=types_pb2.MODEL_KIND_INFER,
            max_batch_size=64,
            version="1",
            streaming=True,
        )
        return worker_pb2.DescribeResponse(models=[info])

    def _flagged(self) -> bool:
        return bool(self._flag) and os.path.exists(self._flag)

    def Infer(
        self, request: worker_pb2.InferBatchRequest, context: grpc.ServicerContext
    ) -> worker_pb2.InferBatchResponse:
        if self._flagged():
            if self._delay > 0:
                time.sleep(self._delay)
            if self._fails():
                context.abort(
                    grpc.StatusCode.UNAVAILABLE, "injected fault: unavailable while flagged"
                )
        results = [
            worker_pb2.InferResult(outputs=worker_pb2.InferOutputs(tensors=list(item.inputs)))
            for item in request.items
        ]
        return worker_pb2.InferBatchResponse(results=results)

    def Generate(
        self, request: types_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[types_pb2.GenerateChunk]:
        if self._flagged():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "injected fault: admission full")
        words = request.messages[-1].content.split() if request.messages else []
        for n, word in enumerate(words):
            yield types_pb2.GenerateChunk(text=(" " if n else "") + word)
        usage = types_pb2.Usage(prompt_tokens=len(words), completion_tokens=len(words))
        yield types_pb2.GenerateChunk(finish_reason=types_pb2.FINISH_REASON_STOP, usage=usage)
