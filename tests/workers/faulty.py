"""Workers that misbehave on purpose, for the gateway's fault scenarios.

Served with ``python -m infergate_worker serve faulty:Unavailable`` and
``PYTHONPATH`` pointing here.
"""

from __future__ import annotations

import os

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
    """Echoes its input tensors, except that while the file named by the
    ``FAULTY_FLAG`` environment variable exists every call fails at once with
    UNAVAILABLE: a worker that fails fast, then recovers when the test says."""

    def __init__(self) -> None:
        self._flag = os.environ.get("FAULTY_FLAG", "")

    def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.ServicerContext
    ) -> worker_pb2.DescribeResponse:
        info = types_pb2.ModelInfo(
            name="flaky",
            kind=types_pb2.MODEL_KIND_INFER,
            max_batch_size=64,
            version="1",
        )
        return worker_pb2.DescribeResponse(models=[info])

    def Infer(
        self, request: worker_pb2.InferBatchRequest, context: grpc.ServicerContext
    ) -> worker_pb2.InferBatchResponse:
        if self._flag and os.path.exists(self._flag):
            context.abort(
                grpc.StatusCode.UNAVAILABLE, "injected fault: unavailable while flagged"
            )
        results = [
            worker_pb2.InferResult(
                outputs=worker_pb2.InferOutputs(tensors=list(item.inputs))
            )
            for item in request.items
        ]
        return worker_pb2.InferBatchResponse(results=results)
