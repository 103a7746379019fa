"""The embedded host: the same servicer a worker process runs, driven from
the caller's thread with serialized messages (as the gateway does via pyo3)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from messages import echo_item

from infergate.v1 import types_pb2, worker_pb2
from infergate_worker.embedded import Aborted, Call, Host

ECHO = "infergate_worker.examples.echo:Echo"


@pytest.fixture(scope="module")
def host() -> Host:
    h = Host(ECHO)
    h.load()
    return h


def infer(host: Host, items: list, call: Call | None = None) -> worker_pb2.InferBatchResponse:
    req = worker_pb2.InferBatchRequest(model="echo", items=items).SerializeToString()
    out = host.infer(req, call or Call("r", "", None))
    return worker_pb2.InferBatchResponse.FromString(out)


def test_describe_and_per_item_results(host: Host):
    info = worker_pb2.DescribeResponse.FromString(host.describe())
    assert [m.name for m in info.models] == ["echo"]
    resp = infer(host, [echo_item(x=[1.0, 2.0]), echo_item({"fail": True}, y=[3.0])])
    assert list(resp.results[0].outputs.tensors[0].fp32_contents) == [1.0, 2.0]
    assert resp.results[1].error.code == types_pb2.ItemError.CODE_MODEL_ERROR


def test_timings_come_back_as_trailers(host: Host):
    call = Call("r", "", None)
    infer(host, [echo_item({"delay_ms": 30}, x=[1.0])], call)
    trailers = dict(call.trailers)
    assert float(trailers["x-infergate-inference-time"]) >= 0.03


def test_a_deadline_reaches_model_code_and_ends_the_call_with_its_status(host: Host):
    started = time.monotonic()
    with pytest.raises(Aborted) as err:
        infer(host, [echo_item({"delay_ms": 2000}, x=[1.0])], Call("late", "", 0.1))
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert time.monotonic() - started < 1.0


def test_cancelling_from_another_thread_stops_model_code(host: Host):
    call = Call("gone", "", None)
    threading.Timer(0.1, call.cancel).start()
    started = time.monotonic()
    with pytest.raises(Aborted) as err:
        infer(host, [echo_item({"delay_ms": 2000}, x=[1.0])], call)
    assert err.value.code == grpc.StatusCode.CANCELLED.value[0]
    assert time.monotonic() - started < 1.0


def test_generation_streams_chunk_by_chunk(host: Host):
    req = types_pb2.GenerateRequest(
        model="echo", messages=[types_pb2.ChatMessage(role="user", content="one two three")]
    ).SerializeToString()
    chunks = [types_pb2.GenerateChunk.FromString(c) for c in host.generate(req, Call("g", "", 5))]
    assert "".join(c.text for c in chunks) == "one two three"
    assert chunks[-1].finish_reason == types_pb2.FINISH_REASON_STOP


def test_only_model_classes_can_be_embedded():
    with pytest.raises(TypeError):
        Host("models:RawWorker")


def test_embeddings_come_back_as_float32_buffers_with_their_errors():
    h = Host("models:Vectors")
    h.load()
    rows = h.embed("vectors", ["a", "bb", "fail", "dddd"], Call("e", "", None))
    assert [t for _, t in rows] == [1, 2, 0, 4]
    first = rows[0][0]
    assert first.dtype.name == "float32" and first.flags["C_CONTIGUOUS"]
    assert list(first) == [1.0, 0.0]
    # The failing text failed its chunk of max_batch_size as a whole; the
    # chunk was run again text by text, so only that text fails.
    assert rows[2][0] == (types_pb2.ItemError.CODE_MODEL_ERROR, "ValueError: asked to fail")
    assert list(rows[3][0]) == [4.0, 0.0] and rows[3][1] == 4
    with pytest.raises(Aborted) as err:
        h.embed("nope", ["x"], Call("e", "", None))
    assert err.value.code == grpc.StatusCode.NOT_FOUND.value[0]
