from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infergate.v1 import worker_pb2_grpc

HERE = Path(__file__).resolve().parent


class WorkerProc:
    def __init__(self, proc: subprocess.Popen, target: str, log: Path) -> None:
        self.proc = proc
        self.target = target
        self.log = log
        self.channel = grpc.insecure_channel(target)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self, service: str) -> int:
        req = health_pb2.HealthCheckRequest(service=service)
        return self.health.Check(req, timeout=2).status

    def wait_status(self, service: str, status: int, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            try:
                last = self.status(service)
                if last == status:
                    return
            except grpc.RpcError as exc:
                last = exc.code()
            time.sleep(0.05)
        raise AssertionError(f"{service} never reached {status}, last {last}\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    procs: list[WorkerProc] = []

    def start(
        *targets: str, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> WorkerProc:
        sock = tmp_path / f"w{len(procs)}.sock"
        log = tmp_path / f"w{len(procs)}.log"
        full_env = {**os.environ, "PYTHONPATH": str(HERE), **(env or {})}
        cmd = [
            sys.executable,
            "-m",
            "infergate_worker",
            "serve",
            *targets,
            *args,
            "--listen",
            f"unix:{sock}",
        ]
        proc = subprocess.Popen(cmd, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        w = WorkerProc(proc, f"unix:{sock}", log)
        procs.append(w)
        end = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"worker did not start:\n{w.output()}")
            time.sleep(0.02)
        return w

    yield start
    for w in procs:
        w.channel.close()
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()
