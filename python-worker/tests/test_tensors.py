"""Tensor messages in both forms: typed contents and raw little-endian bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from infergate.v1 import types_pb2
from infergate_worker.tensors import Tensor, as_tensor

RAW_TYPES = {
    "BOOL": ("?", [True, False, True]),
    "INT8": ("b", [-128, 0, 127]),
    "INT16": ("h", [-32768, 1, 32767]),
    "INT32": ("i", [-(2**31), 2, 2**31 - 1]),
    "INT64": ("q", [-(2**63), 3, 2**63 - 1]),
    "UINT8": ("B", [0, 1, 255]),
    "UINT16": ("H", [0, 1, 65535]),
    "UINT32": ("I", [0, 1, 2**32 - 1]),
    "UINT64": ("Q", [0, 1, 2**64 - 1]),
    "FP32": ("f", [-1.5, 0.0, 2.25]),
    "FP64": ("d", [-1.5, 1e-300, 2.25]),
}


@pytest.mark.parametrize("datatype", sorted(RAW_TYPES))
def test_raw_tensors_read_as_typed_views_and_go_back_raw_unchanged(datatype: str):
    fmt, values = RAW_TYPES[datatype]
    raw = struct.pack(f"<{len(values)}{fmt}", *values)
    msg = types_pb2.Tensor(name="x", datatype=datatype, shape=[3], raw_contents=raw)
    t = Tensor.from_proto(msg)
    assert list(t.data) == values
    assert t.numpy().tolist() == values
    t.numpy()[0] = values[1]  # a model may write into its array
    assert list(t.data) == values
    back = t.to_proto()
    assert back.raw_contents == raw
    assert Tensor.from_proto(back) == t


def test_arrays_a_model_returns_go_raw_and_half_floats_go_typed():
    out = as_tensor("y", np.arange(6, dtype=np.int64).reshape(2, 3)).to_proto()
    assert (list(out.shape), out.raw_contents) == ([2, 3], struct.pack("<6q", *range(6)))
    assert not out.int64_contents
    half = as_tensor("h", np.array([0.5, 1.5], dtype=np.float16)).to_proto()
    assert (half.raw_contents, list(half.fp32_contents)) == (b"", [0.5, 1.5])
    text = as_tensor("t", ["a", "b"]).to_proto()
    assert (text.raw_contents, list(text.bytes_contents)) == (b"", [b"a", b"b"])


def test_typed_tensors_stay_typed():
    msg = types_pb2.Tensor(name="x", datatype="FP32", shape=[2], fp32_contents=[1.0, 2.0])
    t = Tensor.from_proto(msg)
    assert t.data == [1.0, 2.0]
    assert t.to_proto() == msg


@pytest.mark.parametrize(
    ("msg", "why"),
    [
        (
            types_pb2.Tensor(name="x", datatype="FP32", shape=[2], raw_contents=b"\0" * 7),
            "raw_contents holds 7 bytes, not a whole number of 4-byte FP32 values",
        ),
        (
            types_pb2.Tensor(name="x", datatype="FP32", shape=[3], raw_contents=b"\0" * 8),
            "shape [3] needs 3 values, got 2",
        ),
        (
            types_pb2.Tensor(
                name="x", datatype="FP64", shape=[1], raw_contents=b"\0" * 8, fp64_contents=[1.0]
            ),
            "raw_contents and fp64_contents are both filled",
        ),
        (
            types_pb2.Tensor(name="x", datatype="BYTES", shape=[1], raw_contents=b"abc"),
            "BYTES values cannot come in raw_contents",
        ),
        (
            types_pb2.Tensor(name="x", datatype="FP16", shape=[1], raw_contents=b"\0\0"),
            "FP16 values cannot come in raw_contents",
        ),
    ],
)
def test_malformed_raw_tensors_are_refused_with_the_reason(msg: types_pb2.Tensor, why: str):
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
        Tensor.from_proto(msg)


def test_bytes_tensors_take_str_values_and_arrive_as_bytes():
    from infergate_worker import InferInput, InferItem

    msg = Tensor("t", "BYTES", [2], ["héllo", b"raw"]).to_proto()
    assert list(msg.bytes_contents) == ["héllo".encode(), b"raw"]
    assert Tensor.from_proto(msg).data == ["héllo".encode(), b"raw"]
    # The SDK's item class was renamed; the old name stays for one release.
    assert InferItem is InferInput
