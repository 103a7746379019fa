"""Serve a :class:`Model` inside the gateway process (the ``embedded`` pool
kind): the gateway imports this module through pyo3 and calls a
:class:`Host` from its own threads.

The Host drives the same :class:`~infergate_worker.runner.ModelRunner` a
worker process's gRPC service does, so a model sees no difference: the same
batching of its calls, the same :func:`~infergate_worker.current_context`
(deadline, cancellation, request id, trace id), the same per-item errors
and logs. Messages cross as serialized protobuf; model code runs on the
calling gateway thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import faulthandler
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from infergate.v1 import types_pb2, worker_pb2
from infergate_worker.codec import item_error, timings
from infergate_worker.context import CallContext
from infergate_worker.loader import load_target
from infergate_worker.logs import CallFields, JsonFormatter
from infergate_worker.model import Model
from infergate_worker.runner import CallFailed, ModelRunner

log = logging.getLogger("infergate_worker")

T = TypeVar("T")


class Aborted(Exception):
    """The call failed as a whole; ``code`` is its gRPC status code (the
    gateway maps it as it maps a worker's status)."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Call:
    """One call from the gateway: its context (request id, trace, deadline,
    cancellation) and, once it ends, the timings it reports back."""

    def __init__(self, request_id: str, traceparent: str, timeout: float | None) -> None:
        self.context = CallContext(
            request_id=request_id,
            traceparent=traceparent,
            deadline=None if timeout is None else time.monotonic() + timeout,
        )
        self.trailers: tuple[tuple[str, str], ...] = ()

    def cancel(self) -> None:
        """The caller left or its deadline passed: model code sees it."""
        self.context.cancel()

    def finish(self) -> None:
        """The call ended: its timings are final, and any model work left stops."""
        self.trailers = timings(self.context)
        self.context.cancel()


class _Inline(concurrent.futures.Executor):
    """Runs submitted model code at once, on the calling thread."""

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting runner
            future.set_exception(exc)
        return future


_loops = threading.local()


def _loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop, made on first use."""
    loop = getattr(_loops, "loop", None)
    if loop is None:
        loop = _loops.loop = asyncio.new_event_loop()
    return loop


def _run(call: Call, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` for ``call`` on this thread; a failed call is :class:`Aborted`."""
    try:
        return _loop().run_until_complete(work)
    except CallFailed as exc:
        raise Aborted(int(exc.status), exc.details) from exc
    finally:
        call.finish()


class Host:
    """One model, served to the gateway in-process."""

    def __init__(self, spec: str) -> None:
        target = load_target(spec)
        if not isinstance(target, Model):
            raise TypeError(f"{spec} is a raw servicer; only Model classes can be embedded")
        self.model = target
        self.runner = ModelRunner([target], _Inline())

    def load(self) -> None:
        started = time.monotonic()
        self.model.load()
        log.info("%s loaded in %.1f s", type(self.model).name, time.monotonic() - started)

    def describe(self) -> bytes:
        return self.runner.describe().SerializeToString()

    def infer(self, request: bytes, call: Call) -> bytes:
        """Run ``Infer`` on a serialized request."""
        message = worker_pb2.InferBatchRequest.FromString(request)
        return _run(call, self.runner.infer(message, call.context)).SerializeToString()

    def embed(self, model: str, texts: list[str], call: Call) -> list[tuple[Any, int]]:
        """Embed without serializing: per text, its vector as a contiguous
        float32 array (or a float sequence when the model gave plain lists)
        or ``(code, message)`` of its error, and its token count."""
        rows = _run(call, self.runner.embed_rows(model, texts, call.context))
        return [(_item(row), tokens) for row, tokens in rows]

    def generate(self, request: bytes, call: Call) -> Iterator[bytes]:
        """Run ``Generate``; each chunk serialized, as the model yields it."""
        message = types_pb2.GenerateRequest.FromString(request)
        loop = asyncio.new_event_loop()
        chunks = self.runner.generate(message, call.context)
        try:
            while True:
                try:
                    chunk = loop.run_until_complete(chunks.__anext__())
                except StopAsyncIteration:
                    return
                except CallFailed as exc:
                    raise Aborted(int(exc.status), exc.details) from exc
                if chunk.finish_reason != types_pb2.FINISH_REASON_UNSPECIFIED:
                    call.trailers = timings(call.context)
                yield chunk.SerializeToString()
        finally:
            loop.run_until_complete(chunks.aclose())  # type: ignore[attr-defined]
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


def install(emit: Callable[..., None], level: str = "INFO") -> None:
    """Prepare the interpreter inside the gateway: Python log records go to
    the gateway's log through ``emit(levelno, logger, message, request_id=,
    trace_id=, model=, traceback=)``, the call's ids and model as fields; a
    fatal error in native code (a segfault in an extension) prints every
    thread's Python stack to stderr before the process dies, so the crash is
    attributable."""
    faulthandler.enable(all_threads=True)

    class ToGateway(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                fields = JsonFormatter.fields(record)
                emit(
                    record.levelno,
                    record.name,
                    record.getMessage(),
                    request_id=fields.get("request_id"),
                    trace_id=fields.get("trace_id"),
                    model=fields.get("model"),
                    traceback=fields.get("traceback"),
                )
            except Exception:  # logging must never raise into model code
                self.handleError(record)

    handler = ToGateway()
    handler.addFilter(CallFields())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
