"""``infergate-worker serve module:Class [...] --listen unix:/path|host:port``;
``infergate-worker health host:port`` for container health checks;
``infergate-worker check [name=]module:Class ...`` for the gateway's start-up
check (imports each class, loads nothing)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
from typing import Any

from infergate_worker import logs
from infergate_worker.loader import find_target, load_target
from infergate_worker.server import DEFAULT_MAX_MESSAGE_BYTES, LoadFailed, serve

log = logging.getLogger("infergate_worker")


def _exit_with_parent() -> None:
    """Ask Linux to send SIGTERM if the process that spawned us dies."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _keep_large_buffers(max_message_bytes: int) -> bool:
    """Have glibc serve buffers up to a whole message from its heap and keep
    freed ones, instead of mapping fresh zeroed pages for every large
    message and unmapping them after: with 4 MB tensors that cost a worker
    ~2,400 page faults and about half its CPU per call (page faults 119,000
    -> 2,300 in 6 s; a small call's p99 beside the flood 50 -> 16 ms).
    Skipped where the operator set glibc's malloc tunables or INFERGATE_MALLOC=default.
    Retained memory is bounded by the largest messages in flight at once."""
    if (
        not sys.platform.startswith("linux")
        or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
        or os.environ.get("INFERGATE_MALLOC") == "default"
    ):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL(None)
        # glibc caps the mmap threshold at 32 MiB (64-bit).
        mmap = min(max_message_bytes, 32 * 1024 * 1024)
        return bool(
            libc.mallopt(m_mmap_threshold, mmap) and libc.mallopt(m_trim_threshold, 4 * mmap)
        )
    except (OSError, AttributeError):  # not glibc
        return False


def _loop_factory() -> Any:
    if os.environ.get("INFERGATE_WORKER_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def health(target: str, service: str, timeout: float) -> int:
    """Ask ``target`` for its health; print it; 0 only for SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def check(targets: list[str]) -> int:
    """Import each ``[name=]module:Class`` and check it is a Model or
    WorkerServicer subclass whose declarations hold. For each good one print
    a JSON line ``{"target": name, "models": [...]}`` (a Model's name; a raw
    servicer says at run time), for each bad one a line on stderr named by
    ``name`` (the gateway passes its pool's). Nothing is instantiated."""
    import json

    from infergate_worker.codec import describe
    from infergate_worker.model import Model

    failed = 0
    for target in targets:
        name, _, spec = target.rpartition("=")
        try:
            found = find_target(spec)
            models = [describe(found).name] if issubclass(found, Model) else []
        except (ImportError, ValueError) as exc:
            failed += 1
            print(f"{name}: {exc}" if name else str(exc), file=sys.stderr)
            continue
        print(json.dumps({"target": name or spec, "models": models}))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infergate-worker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="serve model classes over the Worker gRPC contract")
    run.add_argument("targets", nargs="+", metavar="module:Class")
    run.add_argument("--listen", required=True, help="unix:/path/to.sock or host:port")
    run.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("INFERGATE_THREADS", "1")),
        help="model threads (concurrent batches); default 1",
    )
    run.add_argument(
        "--grace", type=float, default=30.0, help="seconds to finish in-flight calls after SIGTERM"
    )
    run.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=256,
        help="calls admitted at once; more are refused (RESOURCE_EXHAUSTED)",
    )
    run.add_argument(
        "--max-message-bytes",
        type=int,
        default=int(os.environ.get("INFERGATE_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES)),
        help="largest gRPC message taken or sent; keep it equal to the gateway's "
        "workers.max_message_bytes (default 64 MiB)",
    )
    run.add_argument("--log-level", default=os.environ.get("INFERGATE_LOG_LEVEL", "INFO"))
    run.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("INFERGATE_LOG_FORMAT", "text"),
        help="json: one object per record (used by the gateway, which forwards the fields)",
    )
    run.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit when the spawning process dies (used by the gateway)",
    )
    probe = sub.add_parser("health", help="exit 0 if a worker reports SERVING (grpc.health.v1)")
    probe.add_argument("target", help="host:port or unix:/path of the worker")
    probe.add_argument("--service", default="", help="model name; default: the whole worker")
    probe.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    imports = sub.add_parser(
        "check", help="import each class and check it is a Model or WorkerServicer; load nothing"
    )
    imports.add_argument("targets", nargs="+", metavar="[name=]module:Class")
    args = parser.parse_args(argv)
    if args.command == "health":
        return health(args.target, args.service, args.timeout)
    if args.command == "check":
        return check(args.targets)

    logs.configure(args.log_level, args.log_format)
    if args.exit_with_parent:
        _exit_with_parent()
    _keep_large_buffers(max(args.max_message_bytes, 1024))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        targets = [load_target(spec) for spec in args.targets]
    except ImportError as exc:
        raise SystemExit(str(exc)) from exc
    coro = serve(
        targets,
        args.listen,
        threads=max(args.threads, 1),
        grace=args.grace,
        max_concurrent_rpcs=max(args.max_concurrent_rpcs, 1),
        max_message_bytes=max(args.max_message_bytes, 1024),
    )
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(coro)
    except KeyboardInterrupt:
        return 130
    except LoadFailed as exc:
        fields = {"model": exc.model, "event": "load_failed"}
        log.error("%s", exc, exc_info=exc.__cause__, extra=fields)
        return logs.EXIT_LOAD_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
