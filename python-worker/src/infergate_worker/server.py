"""The grpc.aio server that serves :class:`Model` classes as ``infergate.v1.Worker``.

Model methods are blocking (PyTorch releases the GIL while it computes), so
they run on a thread pool; the event loop only moves bytes. Cancellation of a
call (the gateway's deadline or its client leaving) sets the call's
:class:`CallContext` so model code can stop early. This module runs the
server (health, reflection, draining); :mod:`infergate_worker.servicer` is
the service and :mod:`infergate_worker.runner` runs the model code.
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
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from infergate.v1 import worker_pb2, worker_pb2_grpc
from infergate_worker.model import Model
from infergate_worker.servicer import ModelServicer

log = logging.getLogger("infergate_worker")

# The largest gRPC message a worker takes or sends; the gateway's
# `workers.max_message_bytes` (same default) is passed as --max-message-bytes
# to the workers it spawns, and batches are cut to fit it.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class LoadFailed(Exception):
    """A model's ``load()`` raised (the cause); the worker cannot serve."""

    def __init__(self, model: str, cause: BaseException) -> None:
        lines = str(cause).strip().splitlines()
        what = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
        super().__init__(f"{model} failed to load: {what}")
        self.model = model


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
            try:
                await loop.run_in_executor(executor, model.load)
            except Exception as exc:
                raise LoadFailed(type(model).name, exc) from exc
            log.info("%s loaded in %.1f s", type(model).name, time.monotonic() - started)
        for name in [*names, ""]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s", ", ".join(names), extra={"event": "loaded"})
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
