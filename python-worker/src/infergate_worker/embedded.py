"""Serve a :class:`Model` inside the gateway process (the ``embedded`` pool
kind): the gateway imports this module through pyo3 and calls a
:class:`Host` from its own threads.

The Host drives the very :class:`~infergate_worker.server.ModelServicer` a
worker process runs, with an in-thread call context instead of a gRPC one,
so a model sees no difference: the same batching of its calls, the same
:func:`~infergate_worker.current_context` (deadline, cancellation, request
id, trace id), the same per-item errors and logs. Messages cross as
serialized protobuf; model code runs on the calling gateway thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import faulthandler
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from infergate.v1 import types_pb2, worker_pb2
from infergate_worker.cli import load_target
from infergate_worker.model import Model
from infergate_worker.server import ModelServicer, RequestIdFilter, item_error

log = logging.getLogger("infergate_worker")


class Aborted(grpc.aio.AbortError):
    """The servicer ended a call with a status (the gateway maps ``code``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code.value[0]
        self.details = details


class Call:
    """One call's stand-in for ``grpc.aio.ServicerContext``: its metadata,
    deadline and cancellation, and the trailing metadata it sets."""

    def __init__(self, request_id: str, traceparent: str, timeout: float | None) -> None:
        self._metadata = (("x-request-id", request_id), ("traceparent", traceparent))
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._callbacks: list[Callable[[Any], None]] = []
        self._lock = threading.Lock()
        self._done = False
        self.trailers: tuple[tuple[str, str], ...] = ()

    # --- what ModelServicer asks of a ServicerContext ---
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Aborted(code, details)

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailers = tuple(metadata)

    # --- what the gateway calls ---
    def cancel(self) -> None:
        """The caller left or its deadline passed: model code sees it."""
        self.finish()

    def finish(self) -> None:
        with self._lock:
            callbacks, self._callbacks, self._done = self._callbacks, [], True
        for callback in callbacks:
            callback(self)


class _Inline(concurrent.futures.Executor):
    """Runs submitted model code at once, on the calling thread."""

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting servicer
            future.set_exception(exc)
        return future


_loops = threading.local()


def _loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop, made on first use."""
    loop = getattr(_loops, "loop", None)
    if loop is None:
        loop = _loops.loop = asyncio.new_event_loop()
    return loop


class Host:
    """One model, served to the gateway in-process."""

    def __init__(self, spec: str) -> None:
        target = load_target(spec)
        if not isinstance(target, Model):
            raise TypeError(f"{spec} is a raw servicer; only Model classes can be embedded")
        self.model = target
        self.servicer = ModelServicer([target], _Inline())  # type: ignore[arg-type]

    def load(self) -> None:
        started = time.monotonic()
        self.model.load()
        log.info("%s loaded in %.1f s", type(self.model).name, time.monotonic() - started)

    def describe(self) -> bytes:
        reply = _loop().run_until_complete(
            self.servicer.Describe(worker_pb2.DescribeRequest(), None)
        )
        return reply.SerializeToString()

    def infer(self, request: bytes, call: Call) -> bytes:
        """Run ``Infer`` on a serialized request (tensor items stay protobuf:
        the SDK's Tensor holds plain lists either way)."""
        message = worker_pb2.InferBatchRequest.FromString(request)
        try:
            reply = _loop().run_until_complete(self.servicer.Infer(message, call))
        finally:
            call.finish()
        return reply.SerializeToString()

    def embed(self, model: str, texts: list[str], call: Call) -> list[tuple[Any, int]]:
        """Embed without serializing: per text, its vector as a contiguous
        float32 array (or a float sequence when the model gave plain lists)
        or ``(code, message)`` of its error, and its token count."""
        try:
            rows = _loop().run_until_complete(self.servicer.embed_rows(model, texts, call))
        finally:
            call.finish()
        return [(_item(row), tokens) for row, tokens in rows]

    def generate(self, request: bytes, call: Call) -> Iterator[bytes]:
        """Run ``Generate``; each chunk serialized, as the model yields it."""
        message = types_pb2.GenerateRequest.FromString(request)
        loop = asyncio.new_event_loop()
        chunks = self.servicer.Generate(message, call)
        try:
            while True:
                try:
                    chunk = loop.run_until_complete(chunks.__anext__())
                except StopAsyncIteration:
                    return
                yield chunk.SerializeToString()
        finally:
            loop.run_until_complete(chunks.aclose())
            loop.close()
            call.finish()


def _item(row: Any) -> Any:
    if isinstance(row, BaseException):
        err = item_error(row)
        return (err.code, err.message)
    if hasattr(row, "astype"):  # a numpy row: hand over its buffer
        import numpy as np

        return np.ascontiguousarray(row, dtype=np.float32)
    return row


def install(emit: Callable[[int, str, str], None], level: str = "INFO") -> None:
    """Prepare the interpreter inside the gateway: Python log records go to
    the gateway's log through ``emit(levelno, logger, message)``, with the
    request and trace ids of the call; a fatal error in native code (a
    segfault in an extension) prints every thread's Python stack to stderr
    before the process dies, so the crash is attributable."""
    faulthandler.enable(all_threads=True)

    class ToGateway(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                emit(record.levelno, record.name, self.format(record))
            except Exception:  # logging must never raise into model code
                self.handleError(record)

    handler = ToGateway()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("[request_id=%(request_id)s trace_id=%(trace_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
