"""Drive a running gateway's gRPC port with ``tritonclient.grpc`` as its users
do (Open Inference Protocol v2, ``inference.GRPCInferenceService``). Usage::

    python triton_grpc.py open 127.0.0.1:50051
    python triton_grpc.py guarded 127.0.0.1:50051 KEY LIMIT

``open``: server and model health and metadata; ``echo`` with every datatype
as the client sends them (raw tensors both ways) and with typed contents
(the message built with tritonclient's own stubs); ``sentiment``; an unknown
model (NOT_FOUND); a deadline (DEADLINE_EXCEEDED).
``guarded`` (a gateway with auth on and a per-key limit of LIMIT calls):
liveness without a key, inference without one (UNAUTHENTICATED), with the
key until the limit (then RESOURCE_EXHAUSTED).

Prints ``ok`` and exits 0, or fails on the first mismatch.
"""

from __future__ import annotations

import sys

import grpc
import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "f64": np.array([0.1, 1e300]),
        "i8": np.array([-128, 127], dtype=np.int8),
        "i32": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        "i64": np.array([[-(2**62), 0, 2**62 + 7]], dtype=np.int64),
        "u8": np.arange(250, 256, dtype=np.uint8),
        "u64": np.array([0, 2**64 - 1], dtype=np.uint64),
        "flags": np.array([True, False, True]),
        "words": np.array([b"caf\xc3\xa9", b"", b"\x00\xffraw"], dtype=np.object_),
    }


def datatype(a: np.ndarray) -> str:
    return "BYTES" if a.dtype == np.object_ else triton.np_to_triton_dtype(a.dtype)


def same(name: str, got: np.ndarray | None, want: np.ndarray) -> None:
    assert got is not None, name
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if want.dtype == np.object_:
        assert list(got.ravel()) == list(want.ravel()), (name, got)
    else:
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        assert np.array_equal(got, want), (name, got, want)


def status_of(call) -> str:  # noqa: ANN001 - any callable
    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status())
    raise AssertionError("the call succeeded")


def echo_inputs(given: dict[str, np.ndarray]) -> list[triton.InferInput]:
    inputs = []
    for name, a in given.items():
        i = triton.InferInput(name, list(a.shape), datatype(a))
        i.set_data_from_numpy(a)
        inputs.append(i)
    return inputs


def typed_echo(channel: grpc.Channel) -> None:
    """A request with typed ``contents`` (what KServe clients send) gets typed
    outputs back, each datatype in the field the protocol gives it."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    req = service_pb2.ModelInferRequest(model_name="echo", id="typed-1")
    tensor = service_pb2.ModelInferRequest.InferInputTensor
    req.inputs.append(tensor(name="f32", datatype="FP32", shape=[2]))
    req.inputs[-1].contents.fp32_contents.extend([1.5, -2.0])
    req.inputs.append(tensor(name="i16", datatype="INT16", shape=[2]))
    req.inputs[-1].contents.int_contents.extend([-32768, 32767])
    req.inputs.append(tensor(name="u32", datatype="UINT32", shape=[1]))
    req.inputs[-1].contents.uint_contents.extend([2**32 - 1])
    req.inputs.append(tensor(name="words", datatype="BYTES", shape=[2]))
    req.inputs[-1].contents.bytes_contents.extend([b"a", b"\xff"])
    resp = stub.ModelInfer(req, timeout=30)
    assert resp.id == "typed-1" and resp.model_name == "echo", resp
    assert not resp.raw_output_contents, "typed in, typed out"
    out = {o.name: o for o in resp.outputs}
    assert list(out["f32"].contents.fp32_contents) == [1.5, -2.0], out["f32"]
    assert list(out["i16"].contents.int_contents) == [-32768, 32767], out["i16"]
    assert list(out["u32"].contents.uint_contents) == [2**32 - 1], out["u32"]
    assert list(out["words"].contents.bytes_contents) == [b"a", b"\xff"], out["words"]
    # A typed value in another datatype's field is the caller's error, named.
    bad = service_pb2.ModelInferRequest(model_name="echo")
    bad.inputs.append(tensor(name="x", datatype="INT32", shape=[1]))
    bad.inputs[-1].contents.int64_contents.extend([1])
    try:
        stub.ModelInfer(bad, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
        assert "inputs[0].contents" in exc.details() and "int_contents" in exc.details(), (
            exc.details()
        )
    else:
        raise AssertionError("INT32 values in int64_contents were taken")


def open_gateway(url: str) -> None:
    client = triton.InferenceServerClient(url=url)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("echo")
    meta = client.get_model_metadata("sentiment", as_json=True)
    assert meta["name"] == "sentiment", meta
    assert meta["inputs"][0]["datatype"] == "BYTES", meta
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "infergate" and "binary_tensor_data" in server["extensions"], server

    given = tensors()
    result = client.infer("echo", echo_inputs(given), request_id="raw-1")
    assert result.get_response().id == "raw-1"
    for name, a in given.items():
        same(name, result.as_numpy(name), a)
    # Only the outputs asked for.
    wanted = [triton.InferRequestedOutput("i8")]
    result = client.infer("echo", echo_inputs(given), outputs=wanted)
    assert [o.name for o in result.get_response().outputs] == ["i8"]

    typed_echo(client._channel)

    text = np.array(
        [b"I love this, it works perfectly!", b"This is broken and I am angry."], dtype=np.object_
    )
    given_text = triton.InferInput("text", [2], "BYTES")
    given_text.set_data_from_numpy(text)
    labels = client.infer("sentiment", [given_text]).as_numpy("label")
    assert list(labels) == [b"positive", b"negative"], labels

    one = {"f32": np.ones((1,), dtype=np.float32)}
    assert (
        status_of(lambda: client.infer("no-such-model", echo_inputs(one))) == "StatusCode.NOT_FOUND"
    )
    assert status_of(lambda: client.is_model_ready("no-such-model")) == "StatusCode.NOT_FOUND"
    slow = lambda: client.infer(  # noqa: E731
        "echo", echo_inputs(one), parameters={"delay_ms": 3000}, client_timeout=0.3
    )
    assert status_of(slow) == "StatusCode.DEADLINE_EXCEEDED"
    print("ok")


def guarded_gateway(url: str, key: str, limit: int) -> None:
    anonymous = triton.InferenceServerClient(url=url)
    assert anonymous.is_server_live(), "liveness needs no key"
    one = {"f32": np.ones((1,), dtype=np.float32)}
    call = lambda **kw: anonymous.infer("echo", echo_inputs(one), **kw)  # noqa: E731
    assert status_of(call) == "StatusCode.UNAUTHENTICATED"
    bearer = {"authorization": f"Bearer {key}"}
    for _ in range(limit):
        same("f32", call(headers=bearer).as_numpy("f32"), one["f32"])
    assert status_of(lambda: call(headers=bearer)) == "StatusCode.RESOURCE_EXHAUSTED"
    print("ok")


if __name__ == "__main__":
    if sys.argv[1] == "open":
        open_gateway(sys.argv[2])
    else:
        guarded_gateway(sys.argv[2], sys.argv[3], int(sys.argv[4]))
