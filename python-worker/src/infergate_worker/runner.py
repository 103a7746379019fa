"""Run a :class:`Model`'s batch methods for one call.

A :class:`ModelRunner` runs model code on its executor's threads with the
call's :class:`CallContext` current, keeps the call's queue and inference
times on that context, turns per-item failures into per-item errors, and
says what failed a whole call as a :class:`CallFailed` with a
:class:`Status`. It knows nothing of gRPC: the gRPC servicer
(:mod:`infergate_worker.servicer`) and the gateway's in-process host
(:mod:`infergate_worker.embedded`) both drive it, so a model sees the same
thing either way.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from infergate.v1 import types_pb2, worker_pb2
from infergate_worker import __version__
from infergate_worker.codec import (
    EmbedRow,
    chunks,
    describe,
    embed_rows,
    fill_result,
    finish_reason,
    generate_input,
    infer_item,
    item_error,
)
from infergate_worker.context import CallContext, Cancelled, use_context
from infergate_worker.model import Chunk, InferInput, InvalidInput, Model, Overloaded, Unavailable
from infergate_worker.tensors import READS_RAW

log = logging.getLogger("infergate_worker")

T = TypeVar("T")


class Status(enum.IntEnum):
    """Why a whole call failed, numbered as the gRPC status codes the
    Worker contract answers with."""

    CANCELLED = 1
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class CallFailed(Exception):
    """The call as a whole failed (not one of its items)."""

    def __init__(self, status: Status, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


def log_ids(ctx: CallContext) -> dict[str, str]:
    """The ids a log record about ``ctx``'s call carries."""
    return {
        "request_id": ctx.request_id or "-",
        "trace_id": ctx.trace_id or "-",
        "model": ctx.model or "-",
    }


class ModelRunner:
    """Runs one or more loaded (or loading) models' calls on ``executor``."""

    def __init__(self, models: list[Model], executor: Executor) -> None:
        self._models = {type(m).name: m for m in models}
        self._infos = {name: describe(m) for name, m in self._models.items()}
        self._executor = executor

    @property
    def model_names(self) -> list[str]:
        return list(self._models)

    def describe(self) -> worker_pb2.DescribeResponse:
        return worker_pb2.DescribeResponse(
            models=list(self._infos.values()), worker_version=__version__, raw_contents=READS_RAW
        )

    def model(self, name: str) -> Model:
        model = self._models.get(name)
        if model is None:
            raise CallFailed(Status.NOT_FOUND, f"model {name!r} is not served here")
        return model

    async def run(self, ctx: CallContext, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking model code on the executor with ``ctx`` as its current
        context. The SDK's exceptions for a whole call become :class:`CallFailed`."""

        submitted = time.monotonic()
        loop = asyncio.get_running_loop()
        watchdog = Overrun(ctx, loop)

        def call() -> T:
            started = time.monotonic()
            ctx.queue_time += started - submitted
            try:
                with use_context(ctx):
                    ctx.check()  # the call may have ended while it queued
                    return fn(*args)
            finally:
                ctx.inference_time += time.monotonic() - started
                watchdog.done()

        try:
            return await loop.run_in_executor(self._executor, call)
        except asyncio.CancelledError:
            # The model may still be running: its watchdog stays.
            cancelled(ctx)
            raise
        except Cancelled as exc:
            # The model stopped when asked to: what it should do, not an error.
            log.debug("model stopped: %s", exc, extra=log_ids(ctx))
            status = Status.DEADLINE_EXCEEDED if exc.reason == "deadline" else Status.CANCELLED
            raise CallFailed(status, str(exc)) from exc
        except Overloaded as exc:
            log.warning("model refused the call: %s", exc, extra=log_ids(ctx))
            raise CallFailed(Status.RESOURCE_EXHAUSTED, str(exc)) from exc
        except Unavailable as exc:
            log.warning("model unavailable: %s", exc, extra=log_ids(ctx))
            raise CallFailed(Status.UNAVAILABLE, str(exc)) from exc
        finally:
            # Here, on the loop's thread, so that the model's thread need not
            # wake the loop to do it (a self-pipe write per batch).
            if watchdog.finished:
                watchdog.cancel()

    async def run_batch(
        self, ctx: CallContext, fn: Callable[..., T], *args: Any, name: str = ""
    ) -> T | Exception:
        """Like :meth:`run`, but a model exception is returned for per-item
        errors (logged as ``name`` failing, by default ``fn``'s name)."""
        try:
            return await self.run(ctx, fn, *args)
        except CallFailed:
            raise
        except Exception as exc:
            name = name or getattr(fn, "__qualname__", "model call")
            log.exception("%s failed", name, extra=log_ids(ctx))
            return exc

    async def embed_rows(self, name: str, texts: list[str], ctx: CallContext) -> list[EmbedRow]:
        """Embed ``texts`` with model ``name``, a batch of at most its
        ``max_batch_size`` at a time: per text, its vector (a sequence or an
        array row) or the exception that failed it, and its token count."""
        model = self.model(name)
        ctx.model = name
        log.debug("embed batch of %d texts", len(texts), extra=log_ids(ctx))
        rows: list[EmbedRow] = []
        for part in chunks(texts, self._infos[name].max_batch_size):
            out = await self.run_batch(ctx, model.embed, list(part))
            if isinstance(out, Exception) and splits(out, len(part), name, ctx):
                for text in part:
                    alone = await self.run_batch(ctx, model.embed, [text])
                    if isinstance(alone, Exception):
                        rows.append((alone, 0))
                    else:
                        rows.extend(embed_rows(alone, 1, name))
            elif isinstance(out, Exception):
                rows.extend((out, 0) for _ in part)
            else:
                rows.extend(embed_rows(out, len(part), name))
        return rows

    async def infer(
        self, request: worker_pb2.InferBatchRequest, ctx: CallContext
    ) -> worker_pb2.InferBatchResponse:
        """Run ``request``'s items, a batch of at most the model's
        ``max_batch_size`` at a time, each answered or failed on its own."""
        model = self.model(request.model)
        ctx.model = request.model
        log.debug("infer batch of %d items", len(request.items), extra=log_ids(ctx))
        # Results are filled where they stand in the response: copying a
        # large tensor from one message into another costs more than its
        # encoding.
        response = worker_pb2.InferBatchResponse()
        results = [response.results.add() for _ in request.items]
        for part in chunks(range(len(request.items)), self._infos[request.model].max_batch_size):
            msgs, outs = [request.items[n] for n in part], [results[n] for n in part]
            label = f"{type(model).__name__}.infer"
            failed = await self.run_batch(ctx, _infer_part, model, msgs, outs, name=label)
            if not isinstance(failed, Exception):
                continue
            # Items that did not decode already hold their own error.
            pending = [(m, r) for m, r in zip(msgs, outs, strict=True) if not r.HasField("error")]
            if splits(failed, len(pending), request.model, ctx):
                for msg, result in pending:
                    result.Clear()
                    alone = await self.run_batch(
                        ctx, _infer_part, model, [msg], [result], name=label
                    )
                    if isinstance(alone, Exception):
                        fill_result(result, alone, None)
            else:
                for _, result in pending:
                    fill_result(result, failed, None)
        return response

    async def generate(
        self, request: types_pb2.GenerateRequest, ctx: CallContext
    ) -> AsyncIterator[types_pb2.GenerateChunk]:
        """The generation's chunks with usage as the model makes them, the
        last one with its finish reason. A caller that stops reading
        (closing this iterator) stops the model, which is logged once."""
        model = self.model(request.model)
        ctx.model = request.model
        log.debug("generate from %d messages", len(request.messages), extra=log_ids(ctx))
        inp = generate_input(request)
        it = await self.run_batch(ctx, lambda: iter(model.generate(inp)))
        if isinstance(it, Exception):
            status = (
                Status.UNIMPLEMENTED if isinstance(it, NotImplementedError) else Status.INTERNAL
            )
            raise CallFailed(status, f"{type(it).__name__}: {it}")
        finished = False
        try:
            async for chunk in self._generation(ctx, it):
                finished = chunk.finish_reason != types_pb2.FINISH_REASON_UNSPECIFIED
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            # The caller may leave while a chunk is being sent (the stream
            # is then closed at its yield), not only while the model makes
            # the next one.
            if not finished:
                cancelled(ctx)
            raise

    async def _generation(
        self, ctx: CallContext, it: Any
    ) -> AsyncIterator[types_pb2.GenerateChunk]:
        done = object()
        produced = 0
        prompt_tokens = 0
        while True:
            piece = await self.run_batch(ctx, next, it, done)
            if isinstance(piece, Exception):
                raise CallFailed(Status.INTERNAL, f"{type(piece).__name__}: {piece}")
            if piece is done:
                break
            chunk = piece if isinstance(piece, Chunk) else Chunk(str(piece))
            produced = chunk.completion_tokens or produced + (1 if chunk.text else 0)
            prompt_tokens = chunk.prompt_tokens or prompt_tokens
            usage = types_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=produced)
            sources = [
                types_pb2.Source(source=s.source, text=s.text, score=s.score) for s in chunk.sources
            ]
            if chunk.finish_reason:
                yield types_pb2.GenerateChunk(
                    text=chunk.text,
                    finish_reason=finish_reason(chunk.finish_reason),
                    usage=usage,
                    sources=sources,
                )
                return
            yield types_pb2.GenerateChunk(text=chunk.text, usage=usage, sources=sources)
        yield types_pb2.GenerateChunk(
            finish_reason=types_pb2.FINISH_REASON_STOP,
            usage=types_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=produced),
        )


#: How long past its deadline a call may run, not asking whether to stop,
#: before the worker says the model is holding its thread.
OVERRUN_GRACE = 1.0


class Overrun:
    """Warn, once, when a call's model code is still running
    :data:`OVERRUN_GRACE` after its deadline and has not asked its context
    whether to stop since the deadline: the caller has had its 504, and the
    model thread it holds serves no one until it returns."""

    def __init__(self, ctx: CallContext, loop: asyncio.AbstractEventLoop) -> None:
        self.ctx, self.finished = ctx, False
        self.timer: asyncio.TimerHandle | None = None
        if ctx.deadline is not None:
            delay = max(ctx.deadline + OVERRUN_GRACE - time.monotonic(), 0.0)
            self.timer = loop.call_later(delay, self.check)

    def check(self) -> None:
        ctx = self.ctx
        if self.finished or ctx.deadline is None or ctx.polled_since(ctx.deadline):
            return
        log.warning(
            "%s is still running %.1f s past its deadline and has not checked its context: "
            "its thread serves no other call until it returns (call current_context().check() "
            "or .wait() between steps, or size the pool's threads for it)",
            ctx.model or "the model",
            time.monotonic() - ctx.deadline,
            extra=log_ids(ctx),
        )

    def done(self) -> None:
        """The model code returned (called from its thread). The timer is
        cancelled by :meth:`cancel` once the loop hears of it, or, for a call
        whose caller left first, fires and finds the model done."""
        self.finished = True

    def cancel(self) -> None:
        """Stop the timer (on the loop's thread)."""
        if self.timer is not None:
            self.timer.cancel()


def splits(failed: Exception, items: int, model: str, ctx: CallContext) -> bool:
    """Whether a batch that failed as a whole with ``failed`` is run again
    item by item, so that only the items that fail alone fail: one bad
    input must not fail, or be blamed on, every caller batched with it.
    Done once per batch (a batch is at most the model's ``max_batch_size``),
    never for a call that is over, counted in ``ctx.batch_splits``."""
    if items < 2 or isinstance(failed, Cancelled) or ctx.cancelled:
        return False
    ctx.batch_splits += 1
    log.warning(
        "%s failed a batch of %d as a whole (%s); running its items one by one",
        model,
        items,
        type(failed).__name__,
        extra=log_ids(ctx),
    )
    return True


def cancelled(ctx: CallContext) -> None:
    """Stop the call's model work, and say so once (the end of the call may
    have cancelled ``ctx`` already, silently)."""
    ctx.cancel()
    if not ctx._cancel_logged:
        ctx._cancel_logged = True
        log.warning("call cancelled by the gateway", extra=log_ids(ctx))


def _infer_part(
    model: Model, msgs: list[worker_pb2.InferItem], results: list[worker_pb2.InferResult]
) -> None:
    """Decode ``msgs``, run them through ``model.infer`` and encode what it
    returns into ``results``, on a model thread: a large tensor's copies on
    the event loop would hold every other call on this worker for
    milliseconds. An item that cannot be decoded gets its own error; an
    exception from the model is raised for the caller to spread."""
    items: list[tuple[worker_pb2.InferResult, InferInput]] = []
    for msg, result in zip(msgs, results, strict=True):
        try:
            items.append((result, infer_item(msg)))
        except ValueError as exc:
            result.error.CopyFrom(item_error(InvalidInput(str(exc))))
    if not items:
        return
    out = model.infer([item for _, item in items])
    if len(out) != len(items):
        raise RuntimeError(f"infer returned {len(out)} results for {len(items)} items")
    declared = type(model).outputs
    for (result, item), value in zip(items, out, strict=True):
        fill_result(result, value, item, declared)
