"""The worker CLI as the gateway drives it: the start-up ``check``, JSON log
records, and the exit status of a model that cannot load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    path = [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, "-m", "infergate_worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_check_names_the_pool_and_what_it_found_and_lists_each_good_models_names():
    out = worker(
        "check",
        "echo=infergate_worker.examples.echo:Echo",
        "typo=models:Vectorz",
        "dict=models:NOT_A_MODEL",
        "cls=json:JSONDecoder",
    )
    assert out.returncode == 1
    assert json.loads(out.stdout) == {"target": "echo", "models": ["echo"]}
    errors = out.stderr.splitlines()
    assert errors[0].startswith(
        "typo: cannot import models:Vectorz: module 'models' has no attribute"
    )
    assert errors[1] == (
        "dict: models:NOT_A_MODEL is a dict object, "
        "not a subclass of infergate_worker.Model or WorkerServicer"
    )
    assert "the class json.decoder.JSONDecoder, not a subclass" in errors[2]
    assert worker("check", "echo=infergate_worker.examples.echo:Echo").returncode == 0


def test_a_model_that_cannot_load_exits_3_with_one_json_record_holding_its_traceback(tmp_path):
    out = worker(
        "serve", "models:BrokenLoad", "--listen", f"unix:{tmp_path}/w.sock", "--log-format", "json"
    )
    assert out.returncode == 3, out.stderr
    records = [json.loads(line) for line in out.stderr.splitlines()]
    failed = [r for r in records if r.get("event") == "load_failed"]
    assert len(failed) == 1, records
    (record,) = failed
    assert record["level"] == "ERROR"
    assert record["model"] == "broken"
    assert record["message"] == (
        "broken failed to load: FileNotFoundError: weights.bin: no such file"
    )
    assert record["traceback"].startswith("Traceback (most recent call last):")
    assert "raise FileNotFoundError" in record["traceback"]
    # Every line it wrote is a record: no bare traceback lines.
    assert all(isinstance(r, dict) and "level" in r for r in records)


class JsonWorker:
    """A worker process writing JSON records, served on a Unix socket."""

    def __init__(self, tmp_path: Path, target: str) -> None:
        import time

        import grpc

        from infergate.v1 import worker_pb2_grpc

        path = [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        self.sock, self.log = tmp_path / "w.sock", tmp_path / "w.log"
        cmd = [sys.executable, "-m", "infergate_worker", "serve", target]
        cmd += ["--listen", f"unix:{self.sock}", "--log-format", "json"]
        self.proc = subprocess.Popen(cmd, env=env, stderr=self.log.open("w"))
        end = time.monotonic() + 30
        while not self.sock.exists():
            assert self.proc.poll() is None and time.monotonic() < end, self.log.read_text()
            time.sleep(0.02)
        self.channel = grpc.insecure_channel(f"unix:{self.sock}")
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def close(self) -> None:
        self.channel.close()
        self.proc.kill()
        self.proc.wait()


def test_a_cooperative_model_stopped_by_its_deadline_logs_no_error(tmp_path):
    import time

    import grpc
    from messages import echo_item

    from infergate.v1 import worker_pb2

    w = JsonWorker(tmp_path, "infergate_worker.examples.echo:Echo")
    try:
        request = worker_pb2.InferBatchRequest(model="echo", items=[echo_item({"delay_ms": 3000})])
        for _ in range(5):
            try:
                w.stub.Infer(request, timeout=0.2, wait_for_ready=True)
                raise AssertionError("the deadline did not end the call")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.5)
        records = w.records()
        stopped = [r for r in records if "echo stopped early" in r["message"]]
        assert len(stopped) == 5, records
        errors = [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
        assert errors == [], errors
    finally:
        w.close()


def test_a_model_that_ignores_its_deadline_is_named_in_a_warning(tmp_path):
    import time

    import grpc

    from infergate.v1 import worker_pb2

    w = JsonWorker(tmp_path, "models:Sleeper")
    try:
        request = worker_pb2.InferBatchRequest(
            model="sleeper", items=[worker_pb2.InferItem(id="a")]
        )
        try:
            w.stub.Infer(request, timeout=0.3, wait_for_ready=True)
            raise AssertionError("the deadline did not end the call")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        end = time.monotonic() + 5
        while not any("past its deadline" in r["message"] for r in w.records()):
            assert time.monotonic() < end, w.records()
            time.sleep(0.05)
        (warning,) = [r for r in w.records() if "past its deadline" in r["message"]]
        assert warning["level"] == "WARNING"
        assert warning["message"].startswith("sleeper is still running")
        assert warning["model"] == "sleeper"
    finally:
        w.close()
