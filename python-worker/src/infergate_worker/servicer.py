"""The ``infergate.v1.Worker`` gRPC service over :class:`ModelRunner`: a
call's metadata and deadline become its :class:`CallContext`, the end of
the RPC cancels it, its timings go back as trailing metadata, and a
:class:`CallFailed` becomes the call's gRPC status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from infergate.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from infergate_worker.codec import embed_result, timings
from infergate_worker.context import CallContext
from infergate_worker.model import Model
from infergate_worker.runner import CallFailed, ModelRunner, Status

T = TypeVar("T")


class ModelServicer(worker_pb2_grpc.WorkerServicer):
    """Serves one or more :class:`Model` instances over the Worker contract."""

    def __init__(self, models: list[Model], executor: Executor) -> None:
        self.runner = ModelRunner(models, executor)

    @property
    def model_names(self) -> list[str]:
        return self.runner.model_names

    async def Describe(self, request: worker_pb2.DescribeRequest, context: Any) -> Any:
        return self.runner.describe()

    async def Embed(self, request: worker_pb2.EmbedBatchRequest, context: Any) -> Any:
        ctx = _call_context(context)
        rows = await _answer(
            context, self.runner.embed_rows(request.model, list(request.texts), ctx)
        )
        context.set_trailing_metadata(timings(ctx))
        return worker_pb2.EmbedBatchResponse(results=[embed_result(*row) for row in rows])

    async def Infer(self, request: worker_pb2.InferBatchRequest, context: Any) -> Any:
        ctx = _call_context(context)
        response = await _answer(context, self.runner.infer(request, ctx))
        context.set_trailing_metadata(timings(ctx))
        return response

    async def Generate(self, request: types_pb2.GenerateRequest, context: Any) -> Any:
        ctx = _call_context(context)
        generation: AsyncIterator[types_pb2.GenerateChunk] = self.runner.generate(request, ctx)
        try:
            async for chunk in generation:
                if chunk.finish_reason != types_pb2.FINISH_REASON_UNSPECIFIED:
                    context.set_trailing_metadata(timings(ctx))
                yield chunk
        except CallFailed as exc:
            await _abort(context, exc)
        except GeneratorExit:
            # grpc closed this stream at a yield (its caller left): the model
            # stops now rather than when the generation is collected.
            await generation.aclose()  # type: ignore[attr-defined]
            raise


async def _answer(context: Any, call: Awaitable[T]) -> T:
    """``call``'s result, or the RPC aborted with its :class:`CallFailed` status."""
    try:
        return await call
    except CallFailed as exc:
        await _abort(context, exc)
        raise  # unreachable: abort raises


async def _abort(context: Any, exc: CallFailed) -> None:
    """End the RPC with ``exc``'s status. When the call stopped because it
    ended (its deadline passed, its client left), grpc may have ended it
    before the status could be sent; sending fails then, and there is no one
    left to answer: that is a cancellation, not an error to log."""
    try:
        await context.abort(grpc.StatusCode[exc.status.name], exc.details)
    except grpc.aio.AbortError:
        raise
    except Exception:
        if exc.status in (Status.DEADLINE_EXCEEDED, Status.CANCELLED) or context.done():
            raise asyncio.CancelledError from None
        raise


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


def _call_context(context: grpc.aio.ServicerContext) -> CallContext:
    remaining = context.time_remaining()
    ctx = CallContext(
        request_id=_metadata(context, "x-request-id"),
        traceparent=_metadata(context, "traceparent"),
        deadline=None if remaining is None else time.monotonic() + remaining,
    )
    # Fires when the RPC ends for any reason; after a normal finish it is moot.
    context.add_done_callback(lambda _: ctx.cancel())
    return ctx
