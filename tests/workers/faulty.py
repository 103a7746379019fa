"""Workers that misbehave on purpose, for the gateway's fault scenarios.

Served with ``python -m infergate_worker serve faulty:Unavailable`` and
``PYTHONPATH`` pointing here.
"""

from __future__ import annotations

import grpc

from infergate.v1 import types_pb2, worker_pb2, worker_pb2_grpc


class Unavailable(worker_pb2_grpc.WorkerServicer):
    """Healthy by its health service, yet every call fails with UNAVAILABLE."""

    def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.ServicerContext
    ) -> worker_pb2.DescribeResponse:
        info = types_pb2.ModelInfo(
            name="broken", kind=types_pb2.MODEL_KIND_INFER, max_batch_size=1, version="1"
        )
        return worker_pb2.DescribeResponse(models=[info])

    def Infer(
        self, request: worker_pb2.InferBatchRequest, context: grpc.ServicerContext
    ) -> worker_pb2.InferBatchResponse:
        context.abort(grpc.StatusCode.UNAVAILABLE, "injected fault: always unavailable")
