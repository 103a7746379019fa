"""The grpc.aio server that serves :class:`Model` classes as ``infergate.v1.Worker``.

Model methods are blocking (PyTorch releases the GIL while it computes), so
they run on a thread pool; the event loop only moves bytes. Cancellation of a
call (the gateway's deadline or its client leaving) sets the call's
:class:`CallContext` so model code can stop early.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from infergate.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from infergate_worker import __version__
from infergate_worker.context import CallContext, Cancelled, current_context, use_context
from infergate_worker.model import (
    Chunk,
    Embeddings,
    GenerateInput,
    InferItem,
    InvalidInput,
    Model,
    Overloaded,
    TensorSpec,
    Unavailable,
)
from infergate_worker.tensors import READS_RAW, Tensor, as_tensor

log = logging.getLogger("infergate_worker")

T = TypeVar("T")

_KINDS = {
    "embed": types_pb2.MODEL_KIND_EMBED,
    "infer": types_pb2.MODEL_KIND_INFER,
    "generate": types_pb2.MODEL_KIND_GENERATE,
}
# The largest gRPC message a worker takes or sends; the gateway's
# `workers.max_message_bytes` (same default) is passed as --max-message-bytes
# to the workers it spawns, and batches are cut to fit it.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_ItemCode = types_pb2.ItemError.Code


def describe(model: Model) -> types_pb2.ModelInfo:
    """The ModelInfo a model class declares."""
    cls = type(model)
    if cls.kind not in _KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {sorted(_KINDS)}, not {cls.kind!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name is empty")
    return types_pb2.ModelInfo(
        name=cls.name,
        version=cls.version,
        kind=_KINDS[cls.kind],
        max_batch_size=max(cls.max_batch_size, 1),
        streaming=cls.streams(),
        embedding_dim=cls.embedding_dim,
        platform=cls.platform,
        inputs=[_spec(t) for t in cls.inputs],
        outputs=[_spec(t) for t in cls.outputs],
    )


def _spec(t: TensorSpec) -> types_pb2.TensorSpec:
    return types_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=list(t.shape))


def item_error(exc: BaseException) -> types_pb2.ItemError:
    """Map an exception raised or returned by model code to a per-item error."""
    if isinstance(exc, InvalidInput):
        return types_pb2.ItemError(code=_ItemCode.CODE_INVALID_INPUT, message=str(exc))
    if isinstance(exc, Cancelled):
        code = (
            _ItemCode.CODE_DEADLINE_EXCEEDED
            if exc.reason == "deadline"
            else _ItemCode.CODE_CANCELLED
        )
        return types_pb2.ItemError(code=code, message=str(exc))
    if isinstance(exc, NotImplementedError):
        return types_pb2.ItemError(code=_ItemCode.CODE_UNIMPLEMENTED, message=str(exc))
    return types_pb2.ItemError(
        code=_ItemCode.CODE_MODEL_ERROR, message=f"{type(exc).__name__}: {exc}"
    )


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


def _log_ids(ctx: CallContext) -> dict[str, str]:
    """The ids a log record about ``ctx``'s call carries."""
    return {"request_id": ctx.request_id or "-", "trace_id": ctx.trace_id or "-"}


def _timings(ctx: CallContext) -> tuple[tuple[str, str], ...]:
    """Where the call's time went, for the gateway (seconds, as text)."""
    return (
        ("x-infergate-queue-time", f"{ctx.queue_time:.6f}"),
        ("x-infergate-inference-time", f"{ctx.inference_time:.6f}"),
    )


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [items]


class ModelServicer(worker_pb2_grpc.WorkerServicer):
    """Serves one or more :class:`Model` instances over the Worker contract."""

    def __init__(self, models: list[Model], executor: ThreadPoolExecutor) -> None:
        self._models = {type(m).name: m for m in models}
        self._infos = {name: describe(m) for name, m in self._models.items()}
        self._executor = executor

    @property
    def model_names(self) -> list[str]:
        return list(self._models)

    async def Describe(self, request: worker_pb2.DescribeRequest, context: Any) -> Any:
        return worker_pb2.DescribeResponse(
            models=list(self._infos.values()), worker_version=__version__, raw_contents=READS_RAW
        )

    async def _model(self, name: str, context: grpc.aio.ServicerContext) -> Model:
        model = self._models.get(name)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not served here")
        return model  # type: ignore[return-value]

    async def _run(
        self, ctx: CallContext, context: grpc.aio.ServicerContext, fn: Callable[..., T], *args: Any
    ) -> T:
        """Run blocking model code on the pool with ``ctx`` as its current context."""

        submitted = time.monotonic()

        def call() -> T:
            started = time.monotonic()
            ctx.queue_time += started - submitted
            try:
                with use_context(ctx):
                    ctx.check()  # the call may have ended while it queued
                    return fn(*args)
            finally:
                ctx.inference_time += time.monotonic() - started

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except asyncio.CancelledError:
            _cancelled(ctx)
            raise
        except Cancelled as exc:
            code = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if exc.reason == "deadline"
                else grpc.StatusCode.CANCELLED
            )
            log.warning("model stopped: %s", exc, extra=_log_ids(ctx))
            await context.abort(code, str(exc))
            raise  # unreachable: abort raises
        except Overloaded as exc:
            log.warning("model refused the call: %s", exc, extra=_log_ids(ctx))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            raise  # unreachable: abort raises
        except Unavailable as exc:
            log.warning("model unavailable: %s", exc, extra=_log_ids(ctx))
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise  # unreachable: abort raises

    async def _run_batch(
        self,
        ctx: CallContext,
        context: grpc.aio.ServicerContext,
        fn: Callable[..., T],
        *args: Any,
        name: str = "",
    ) -> T | Exception:
        """Like :meth:`_run`, but a model exception is returned for per-item
        errors (logged as ``name`` failing, by default ``fn``'s name)."""
        try:
            return await self._run(ctx, context, fn, *args)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            name = name or getattr(fn, "__qualname__", "model call")
            log.exception("%s failed", name, extra=_log_ids(ctx))
            return exc

    async def embed_rows(self, name: str, texts: list[str], context: Any) -> list[EmbedRow]:
        """Embed ``texts`` with model ``name``, a batch of at most its
        ``max_batch_size`` at a time: per text, its vector (a sequence or an
        array row) or the exception that failed it, and its token count."""
        model = await self._model(name, context)
        ctx = _call_context(context)
        log.debug("embed batch of %d texts", len(texts), extra=_log_ids(ctx))
        rows: list[EmbedRow] = []
        for part in _chunks(texts, self._infos[name].max_batch_size):
            out = await self._run_batch(ctx, context, model.embed, list(part))
            if isinstance(out, Exception):
                rows.extend((out, 0) for _ in part)
            else:
                rows.extend(_embed_rows(out, len(part), name))
        context.set_trailing_metadata(_timings(ctx))
        return rows

    async def Embed(self, request: worker_pb2.EmbedBatchRequest, context: Any) -> Any:
        rows = await self.embed_rows(request.model, list(request.texts), context)
        return worker_pb2.EmbedBatchResponse(results=[_embed_result(*row) for row in rows])

    async def Infer(self, request: worker_pb2.InferBatchRequest, context: Any) -> Any:
        model = await self._model(request.model, context)
        ctx = _call_context(context)
        log.debug("infer batch of %d items", len(request.items), extra=_log_ids(ctx))
        # Results are filled where they stand in the response: copying a
        # large tensor from one message into another costs more than its
        # encoding.
        response = worker_pb2.InferBatchResponse()
        results = [response.results.add() for _ in request.items]
        for part in _chunks(range(len(request.items)), self._infos[request.model].max_batch_size):
            msgs, outs = [request.items[n] for n in part], [results[n] for n in part]
            failed = await self._run_batch(
                ctx, context, _infer_part, model, msgs, outs, name=f"{type(model).__name__}.infer"
            )
            if isinstance(failed, Exception):
                for result in outs:
                    if not result.HasField("error"):
                        _fill_result(result, failed, None)
        context.set_trailing_metadata(_timings(ctx))
        return response

    async def Generate(self, request: types_pb2.GenerateRequest, context: Any) -> Any:
        model = await self._model(request.model, context)
        ctx = _call_context(context)
        log.debug("generate from %d messages", len(request.messages), extra=_log_ids(ctx))
        params = request.params
        inp = GenerateInput(
            messages=[{"role": m.role, "content": m.content} for m in request.messages],
            temperature=params.temperature if params.has_temperature else None,
            max_tokens=params.max_tokens or None,
            stop=list(params.stop),
            seed=params.seed or None,
            user=request.user,
        )
        it = await self._run_batch(ctx, context, lambda: iter(model.generate(inp)))
        if isinstance(it, Exception):
            code = (
                grpc.StatusCode.UNIMPLEMENTED
                if isinstance(it, NotImplementedError)
                else grpc.StatusCode.INTERNAL
            )
            await context.abort(code, f"{type(it).__name__}: {it}")
        finished = False
        try:
            async for chunk in self._generation(ctx, context, it):
                finished = chunk.finish_reason != types_pb2.FINISH_REASON_UNSPECIFIED
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            # The caller may leave while a chunk is being sent (the stream
            # is then closed at its yield), not only while the model makes
            # the next one.
            if not finished:
                _cancelled(ctx)
            raise

    async def _generation(self, ctx: CallContext, context: Any, it: Any) -> Any:
        """A generation's pieces from ``it`` as chunks with usage, the last one
        with its finish reason."""
        done = object()
        produced = 0
        prompt_tokens = 0
        while True:
            piece = await self._run_batch(ctx, context, next, it, done)
            if isinstance(piece, Exception):
                await context.abort(grpc.StatusCode.INTERNAL, f"{type(piece).__name__}: {piece}")
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
                context.set_trailing_metadata(_timings(ctx))
                yield types_pb2.GenerateChunk(
                    text=chunk.text,
                    finish_reason=_finish(chunk.finish_reason),
                    usage=usage,
                    sources=sources,
                )
                return
            yield types_pb2.GenerateChunk(text=chunk.text, usage=usage, sources=sources)
        context.set_trailing_metadata(_timings(ctx))
        yield types_pb2.GenerateChunk(
            finish_reason=types_pb2.FINISH_REASON_STOP,
            usage=types_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=produced),
        )


def _cancelled(ctx: CallContext) -> None:
    """Stop the call's model work, and say so once (the RPC's done callback
    may have cancelled ``ctx`` already, silently)."""
    ctx.cancel()
    if not ctx._cancel_logged:
        ctx._cancel_logged = True
        log.warning("call cancelled by the gateway", extra=_log_ids(ctx))


def _finish(reason: str) -> int:
    return types_pb2.FINISH_REASON_LENGTH if reason == "length" else types_pb2.FINISH_REASON_STOP


#: One text's vector (a sequence, or a row of an array) or its failure, and its tokens.
EmbedRow = tuple[Any, int]


def _embed_rows(out: Any, count: int, model: str) -> list[EmbedRow]:
    """Split what ``Model.embed`` returned for ``count`` texts into rows."""
    tokens: Sequence[int] | None = None
    if isinstance(out, Embeddings):
        out, tokens = out.vectors, out.tokens
    if hasattr(out, "detach"):  # torch.Tensor
        out = out.detach().cpu().numpy()
    rows = list(out)
    if len(rows) != count:
        err = RuntimeError(f"{model}.embed returned {len(rows)} vectors for {count}")
        return [(err, 0)] * count
    return [(row, int(tokens[n]) if tokens is not None else 0) for n, row in enumerate(rows)]


def _embed_result(row: Any, tokens: int) -> worker_pb2.EmbedResult:
    if isinstance(row, BaseException):
        return worker_pb2.EmbedResult(error=item_error(row), tokens=tokens)
    values = row.tolist() if hasattr(row, "tolist") else row
    return worker_pb2.EmbedResult(embedding=types_pb2.Embedding(values=values), tokens=tokens)


def _param(value: types_pb2.ParamValue) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


def _to_param(value: Any) -> types_pb2.ParamValue:
    if isinstance(value, bool):
        return types_pb2.ParamValue(bool_param=value)
    if isinstance(value, int):
        return types_pb2.ParamValue(int64_param=value)
    if isinstance(value, float):
        return types_pb2.ParamValue(double_param=value)
    return types_pb2.ParamValue(string_param=str(value))


def _infer_item(msg: worker_pb2.InferItem) -> InferItem:
    inputs = {}
    for t in msg.inputs:
        if t.name in inputs:
            raise ValueError(f"input {t.name!r} given twice")
        inputs[t.name] = Tensor.from_proto(t)
    return InferItem(
        id=msg.id,
        inputs=inputs,
        outputs=list(msg.outputs),
        parameters={k: _param(v) for k, v in msg.parameters.items()},
    )


def _infer_part(
    model: Model, msgs: list[worker_pb2.InferItem], results: list[worker_pb2.InferResult]
) -> None:
    """Decode ``msgs``, run them through ``model.infer`` and encode what it
    returns into ``results``, on a model thread: a large tensor's copies on
    the event loop would hold every other call on this worker for
    milliseconds. An item that cannot be decoded gets its own error; an
    exception from the model is raised for the caller to spread."""
    items: list[tuple[worker_pb2.InferResult, InferItem]] = []
    for msg, result in zip(msgs, results, strict=True):
        try:
            items.append((result, _infer_item(msg)))
        except ValueError as exc:
            result.error.CopyFrom(item_error(InvalidInput(str(exc))))
    if not items:
        return
    out = model.infer([item for _, item in items])
    if len(out) != len(items):
        raise RuntimeError(f"infer returned {len(out)} results for {len(items)} items")
    for (result, item), value in zip(items, out, strict=True):
        _fill_result(result, value, item)


def _fill_result(result: worker_pb2.InferResult, value: Any, item: InferItem | None) -> None:
    """Encode what the model returned for ``item`` into ``result`` (an
    exception needs no item)."""
    if isinstance(value, BaseException):
        result.error.CopyFrom(item_error(value))
        return
    assert item is not None, "a result needs the item it answers"
    outputs = result.outputs
    outputs.SetInParent()
    try:
        params = value.pop("parameters", None) if isinstance(value, dict) else None
        wanted = set(item.outputs)
        unknown = sorted(wanted - set(value))
        if unknown:
            raise InvalidInput(f"no output named {', '.join(map(repr, unknown))}")
        for name, v in value.items():
            if not wanted or name in wanted:
                as_tensor(name, v).fill(outputs.tensors.add())
    except (TypeError, ValueError, AttributeError) as exc:  # InvalidInput is a ValueError
        result.error.CopyFrom(item_error(exc))  # replaces the partial outputs
        return
    for k, v in (params or {}).items():
        outputs.parameters[k].CopyFrom(_to_param(v))


class RequestIdFilter(logging.Filter):
    """Puts the current call's request id and trace id on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current_context()
        if not getattr(record, "request_id", ""):
            record.request_id = ctx.request_id or "-"
        if not getattr(record, "trace_id", ""):
            record.trace_id = ctx.trace_id or "-"
        return True


def _prepare_unix_socket(listen: str) -> None:
    path = listen.removeprefix("unix:").removeprefix("//")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket from a dead process


async def serve(
    targets: list[Model | worker_pb2_grpc.WorkerServicer],
    listen: str,
    *,
    threads: int = 1,
    grace: float = 30.0,
    max_concurrent_rpcs: int = 256,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain and return.

    ``targets`` are Model instances (not yet loaded) or, alone, one raw
    WorkerServicer implementation. Calls beyond ``max_concurrent_rpcs`` are
    refused with RESOURCE_EXHAUSTED instead of queueing without bound.
    """
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="model")
    models = [t for t in targets if isinstance(t, Model)]
    raw = [t for t in targets if not isinstance(t, Model)]
    if raw and (models or len(raw) > 1):
        raise ValueError("a raw WorkerServicer must be served alone")
    servicer = raw[0] if raw else ModelServicer(models, executor)

    server = grpc.aio.server(
        # Lets a raw servicer with plain (non-async) methods be served too.
        migration_thread_pool=executor,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            # The gateway pings every 10 s to find dead connections, also
            # while only an idle health Watch is open. gRPC core's default
            # policy calls that abuse and sends GOAWAY (too_many_pings) after
            # two pings, which would drop every health stream every ~40 s.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    if listen.startswith("unix:"):
        _prepare_unix_socket(listen)
    if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot listen on {listen}")
    await server.start()

    described = servicer.Describe(worker_pb2.DescribeRequest(), None)
    if inspect.isawaitable(described):
        described = await described
    names = [m.name for m in described.models]
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for name in [*names, ""]:
        await health_servicer.set(name, not_serving)
    log.info("listening on %s for %s (pid %d)", listen, ", ".join(names), os.getpid())

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    async def load_all() -> None:
        for model in models:
            started = time.monotonic()
            await loop.run_in_executor(executor, model.load)
            log.info("%s loaded in %.1f s", type(model).name, time.monotonic() - started)
        for name in [*names, ""]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if ready is not None:
            ready.set()

    loader = asyncio.create_task(load_all())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader.done() and loader.exception() is not None:
        stopper.cancel()
        await server.stop(0)
        executor.shutdown(wait=False, cancel_futures=True)
        raise loader.exception()  # type: ignore[misc]
    await stopper

    log.info("draining: NOT_SERVING, finishing in-flight calls (grace %.0f s)", grace)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace)
    loader.cancel()
    executor.shutdown(wait=False, cancel_futures=True)
    log.info("stopped")
