"""The worker SDK against real worker processes over Unix sockets."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from messages import echo_item

from infergate.v1 import types_pb2, worker_pb2
from infergate_worker import cli
from infergate_worker.context import CallContext, Cancelled

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Code = types_pb2.ItemError.Code


def test_not_serving_until_loaded_and_describe_answers_meanwhile(spawn, tmp_path: Path):
    gate = tmp_path / "gate"
    w = spawn("models:SlowLoad", env={"SLOWLOAD_GATE": str(gate)})
    w.wait_status("slowload", NOT_SERVING)
    described = w.stub.Describe(worker_pb2.DescribeRequest(), timeout=5)
    assert [m.name for m in described.models] == ["slowload"]
    assert described.models[0].kind == types_pb2.MODEL_KIND_EMBED
    assert described.models[0].max_batch_size == 4
    time.sleep(0.3)
    assert w.status("slowload") == NOT_SERVING
    gate.touch()
    w.wait_status("slowload", SERVING)
    assert w.status("") == SERVING


def test_per_item_errors_leave_other_items_alone(spawn, tmp_path: Path):
    gate = tmp_path / "gate"
    gate.touch()
    w = spawn("models:SlowLoad", env={"SLOWLOAD_GATE": str(gate)})
    w.wait_status("slowload", SERVING)
    # Six texts with max_batch_size 4: the worker splits them into two batches.
    texts = ["ab", "bad", "abc", "boom", "a", "abcd"]
    req = worker_pb2.EmbedBatchRequest(model="slowload", texts=texts)
    resp = w.stub.Embed(req, timeout=5)
    kinds = [r.WhichOneof("result") for r in resp.results]
    assert kinds == ["embedding", "error", "embedding", "error", "embedding", "embedding"]
    assert list(resp.results[0].embedding.values) == [2.0, 1.0]
    assert list(resp.results[5].embedding.values) == [4.0, 1.0]
    assert resp.results[1].error.code == Code.CODE_INVALID_INPUT
    assert resp.results[3].error.code == Code.CODE_MODEL_ERROR
    assert "exploded" in resp.results[3].error.message


def test_unknown_model_is_not_found(spawn):
    w = spawn("infergate_worker.examples.echo:Echo")
    w.wait_status("echo", SERVING)
    with pytest.raises(grpc.RpcError) as err:
        w.stub.Embed(worker_pb2.EmbedBatchRequest(model="nope", texts=["x"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_echo_infer_and_item_failure(spawn):
    w = spawn("infergate_worker.examples.echo:Echo")
    w.wait_status("echo", SERVING)
    items = [echo_item(x=[1.0, 2.0]), echo_item({"fail": True}, y=[3.0])]
    resp = w.stub.Infer(worker_pb2.InferBatchRequest(model="echo", items=items), timeout=5)
    out = resp.results[0].outputs.tensors[0]
    assert (out.name, list(out.shape), list(out.fp32_contents)) == ("x", [2], [1.0, 2.0])
    assert resp.results[1].error.code == Code.CODE_MODEL_ERROR
    # Embedding an INFER model is an item error, not a crash.
    resp = w.stub.Embed(worker_pb2.EmbedBatchRequest(model="echo", texts=["x"]), timeout=5)
    assert resp.results[0].error.code == Code.CODE_UNIMPLEMENTED


def test_malformed_tensor_is_invalid_input(spawn):
    w = spawn("infergate_worker.examples.echo:Echo")
    w.wait_status("echo", SERVING)
    bad = types_pb2.Tensor(name="x", datatype="FP32", shape=[3], fp32_contents=[1.0])
    item = worker_pb2.InferItem(inputs=[bad])
    resp = w.stub.Infer(worker_pb2.InferBatchRequest(model="echo", items=[item]), timeout=5)
    assert resp.results[0].error.code == Code.CODE_INVALID_INPUT
    assert "needs 3 values" in resp.results[0].error.message


def test_echo_generate_streams_words(spawn):
    w = spawn("infergate_worker.examples.echo:Echo")
    w.wait_status("echo", SERVING)
    req = types_pb2.GenerateRequest(
        model="echo", messages=[types_pb2.ChatMessage(role="user", content="one two three")]
    )
    chunks = list(w.stub.Generate(req, timeout=5))
    assert "".join(c.text for c in chunks) == "one two three"
    assert chunks[-1].finish_reason == types_pb2.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens == 3
    req.params.max_tokens = 2
    chunks = list(w.stub.Generate(req, timeout=5))
    assert "".join(c.text for c in chunks) == "one two"
    assert chunks[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH


def test_deadline_reaches_model_code(spawn, tmp_path: Path):
    marker = tmp_path / "marker"
    w = spawn("models:Patient", env={"PATIENT_MARKER": str(marker)})
    w.wait_status("patient", SERVING)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        w.stub.Embed(
            worker_pb2.EmbedBatchRequest(model="patient", texts=["x"]),
            timeout=0.3,
            metadata=[("x-request-id", "req-42")],
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2
    end = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < end:
        time.sleep(0.02)
    assert marker.read_text() in ("deadline req-42", "cancelled req-42")


def test_client_cancellation_reaches_model_code(spawn, tmp_path: Path):
    marker = tmp_path / "marker"
    w = spawn("models:Patient", env={"PATIENT_MARKER": str(marker)})
    w.wait_status("patient", SERVING)
    future = w.stub.Embed.future(
        worker_pb2.EmbedBatchRequest(model="patient", texts=["x"]),
        timeout=30,
        metadata=[("x-request-id", "req-7")],
    )
    time.sleep(0.3)
    future.cancel()
    end = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < end:
        time.sleep(0.02)
    assert marker.exists(), w.output()
    assert marker.read_text() == "cancelled req-7"
    assert "call cancelled by the gateway" in w.output()


def test_sigterm_drains_in_flight_calls(spawn):
    w = spawn("infergate_worker.examples.echo:Echo")
    w.wait_status("echo", SERVING)
    item = echo_item({"delay_ms": 800}, x=[5.0])
    result: dict = {}

    def call() -> None:
        req = worker_pb2.InferBatchRequest(model="echo", items=[item])
        result["resp"] = w.stub.Infer(req, timeout=10)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)
    w.proc.send_signal(signal.SIGTERM)
    t.join(10)
    assert list(result["resp"].results[0].outputs.tensors[0].fp32_contents) == [5.0]
    assert w.proc.wait(10) == 0
    assert "draining" in w.output()


def test_raw_servicer_is_served_with_health(spawn):
    w = spawn("models:RawWorker")
    w.wait_status("raw", SERVING)
    resp = w.stub.Embed(worker_pb2.EmbedBatchRequest(model="raw", texts=["abc"]), timeout=5)
    assert list(resp.results[0].embedding.values) == [3.0]


def test_call_context_checks():
    ctx = CallContext(deadline=time.monotonic() + 0.05)
    ctx.check()
    with pytest.raises(Cancelled) as exc:
        ctx.wait(1)
    assert exc.value.reason == "deadline"
    ctx = CallContext()
    ctx.cancel()
    with pytest.raises(Cancelled) as exc:
        ctx.check()
    assert exc.value.reason == "cancelled"


def test_reflection_lists_the_worker_service(spawn):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    w = spawn("infergate_worker.examples.echo:Echo")
    w.wait_status("echo", SERVING)
    services = ProtoReflectionDescriptorDatabase(w.channel).get_services()
    assert "infergate.v1.Worker" in services
    assert "grpc.health.v1.Health" in services


def test_calls_beyond_the_bound_are_refused_not_queued(spawn, tmp_path: Path):
    marker = tmp_path / "marker"
    w = spawn(
        "models:Patient",
        env={"PATIENT_MARKER": str(marker)},
        args=("--max-concurrent-rpcs", "1"),
    )
    w.wait_status("patient", SERVING)
    req = worker_pb2.EmbedBatchRequest(model="patient", texts=["x"])
    held = w.stub.Embed.future(req, timeout=30)
    time.sleep(0.3)
    with pytest.raises(grpc.RpcError) as err:
        w.stub.Embed(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    held.cancel()


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_calls_report_their_queue_and_model_time_in_trailers(spawn):
    w = spawn("infergate_worker.examples.echo:Echo")
    w.wait_status("echo", SERVING)
    items = [echo_item({"delay_ms": 50}, x=[1.0])]
    _, call = w.stub.Infer.with_call(
        worker_pb2.InferBatchRequest(model="echo", items=items), timeout=5
    )
    trailers = dict(call.trailing_metadata())
    queue = float(trailers["x-infergate-queue-time"])
    inference = float(trailers["x-infergate-inference-time"])
    assert 0.05 <= inference < 1.0, trailers
    assert 0.0 <= queue < 1.0, trailers
    req = types_pb2.GenerateRequest(
        model="echo", messages=[types_pb2.ChatMessage(role="user", content="a b")]
    )
    stream = w.stub.Generate(req, timeout=5)
    assert "".join(c.text for c in stream) == "a b"
    assert float(dict(stream.trailing_metadata())["x-infergate-inference-time"]) > 0


def test_trace_context_is_exposed_and_logged(spawn):
    assert CallContext(traceparent=TRACEPARENT).trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert CallContext(traceparent="garbage").trace_id == ""
    w = spawn("infergate_worker.examples.echo:Echo")
    w.wait_status("echo", SERVING)
    items = [echo_item({"delay_ms": 2000}, x=[1.0])]
    with pytest.raises(grpc.RpcError):
        w.stub.Infer(
            worker_pb2.InferBatchRequest(model="echo", items=items),
            timeout=0.2,
            metadata=[("x-request-id", "req-trace"), ("traceparent", TRACEPARENT)],
        )
    end = time.monotonic() + 5
    want = "[request_id=req-trace trace_id=4bf92f3577b34da6a3ce929d0e0e4736] echo stopped early"
    while want not in w.output() and time.monotonic() < end:
        time.sleep(0.02)
    assert want in w.output(), w.output()


def test_health_command_exits_zero_only_when_serving(spawn, tmp_path: Path):
    w = spawn("infergate_worker.examples.echo:Echo")
    w.wait_status("echo", SERVING)
    assert cli.main(["health", w.target]) == 0
    assert cli.main(["health", w.target, "--service", "nope"]) == 1
    dead = f"unix:{tmp_path / 'nobody.sock'}"
    assert cli.main(["health", dead, "--timeout", "0.5"]) == 1


def test_a_cancellation_at_the_deadline_is_reported_as_the_deadline():
    ctx = CallContext(deadline=time.monotonic() + 0.005)
    ctx.cancel()  # the gateway's cancellation, landing just before this clock's deadline
    with pytest.raises(Cancelled) as exc:
        ctx.check()
    assert exc.value.reason == "deadline"
    early = CallContext(deadline=time.monotonic() + 10)
    early.cancel()
    with pytest.raises(Cancelled) as exc:
        early.wait(1)
    assert exc.value.reason == "cancelled"


def test_a_large_raw_tensor_round_trips_through_a_worker_as_raw(spawn):
    w = spawn("infergate_worker.examples.echo:Echo")
    w.wait_status("echo", SERVING)
    assert w.stub.Describe(worker_pb2.DescribeRequest(), timeout=5).raw_contents
    raw = np.arange(1_000_000, dtype="<f4").tobytes()
    x = types_pb2.Tensor(name="x", datatype="FP32", shape=[1000, 1000], raw_contents=raw)
    items = [worker_pb2.InferItem(id="a", inputs=[x])]
    resp = w.stub.Infer(worker_pb2.InferBatchRequest(model="echo", items=items), timeout=10)
    out = resp.results[0].outputs.tensors[0]
    assert (list(out.shape), out.raw_contents, len(out.fp32_contents)) == ([1000, 1000], raw, 0)
    # A malformed raw tensor is that item's invalid input, not the batch's failure.
    bad = types_pb2.Tensor(name="x", datatype="FP32", shape=[2], raw_contents=b"\0" * 7)
    items = [worker_pb2.InferItem(id="b", inputs=[bad]), echo_item(x=[1.0])]
    resp = w.stub.Infer(worker_pb2.InferBatchRequest(model="echo", items=items), timeout=10)
    assert resp.results[0].error.code == Code.CODE_INVALID_INPUT
    assert "not a whole number of 4-byte FP32 values" in resp.results[0].error.message
    assert list(resp.results[1].outputs.tensors[0].fp32_contents) == [1.0]


def test_large_buffers_are_kept_unless_the_operator_tuned_malloc(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("INFERGATE_MALLOC", raising=False)
    assert cli._keep_large_buffers(64 * 1024 * 1024)  # Linux with glibc, as CI
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")
    assert not cli._keep_large_buffers(64 * 1024 * 1024)
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("INFERGATE_MALLOC", "default")
    assert not cli._keep_large_buffers(64 * 1024 * 1024)


class _Context:
    """The parts of grpc.aio.ServicerContext that Generate uses."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("x-request-id", self.request_id)]

    def add_done_callback(self, callback: object) -> None:
        pass

    def set_trailing_metadata(self, metadata: object) -> None:
        pass


def test_a_stream_closed_while_a_chunk_is_sent_stops_the_model_and_says_so(caplog):
    """A caller that leaves while a chunk is on its way: grpc closes the
    generator at its yield, not at the model's next step."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from infergate_worker.examples.echo import Echo
    from infergate_worker.servicer import ModelServicer

    model = Echo()
    model.load()
    servicer = ModelServicer([model], ThreadPoolExecutor(1))
    words = " ".join(f"w{i}" for i in range(50))
    request = types_pb2.GenerateRequest(
        model="echo", messages=[types_pb2.ChatMessage(role="user", content=words)]
    )

    async def leave_after_one_chunk() -> None:
        stream = servicer.Generate(request, _Context("leaves-at-a-yield"))
        first = await stream.__anext__()
        assert first.text == "w0"
        await stream.aclose()

    with caplog.at_level("WARNING", logger="infergate_worker"):
        asyncio.run(leave_after_one_chunk())
    cancelled = [r for r in caplog.records if r.getMessage() == "call cancelled by the gateway"]
    assert [r.request_id for r in cancelled] == ["leaves-at-a-yield"]
