"""Conversion between ``infergate.v1.Tensor`` messages and Python values.

The SDK does not need numpy; :meth:`Tensor.numpy` imports it on demand, and
numpy arrays or torch tensors returned by models are converted by duck typing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from infergate.v1 import types_pb2

_FIELD_BY_TYPE = {
    "BOOL": "bool_contents",
    "INT8": "int64_contents",
    "INT16": "int64_contents",
    "INT32": "int64_contents",
    "INT64": "int64_contents",
    "UINT8": "uint64_contents",
    "UINT16": "uint64_contents",
    "UINT32": "uint64_contents",
    "UINT64": "uint64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_NUMPY_DTYPE = {
    "BOOL": "bool",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_DATATYPE_BY_NUMPY = {v: k for k, v in _NUMPY_DTYPE.items()}


def contents_field(datatype: str) -> str:
    """The ``Tensor`` field that holds values of ``datatype``."""
    try:
        return _FIELD_BY_TYPE[datatype]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r}") from None


@dataclass
class Tensor:
    """A named tensor: flat row-major ``data`` with a ``shape``."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any]

    @classmethod
    def from_proto(cls, msg: types_pb2.Tensor) -> Tensor:
        """Decode a message, checking that the element count fits the shape."""
        data = list(getattr(msg, contents_field(msg.datatype)))
        expected = math.prod(msg.shape)
        if expected != len(data):
            raise ValueError(
                f"tensor {msg.name!r}: shape {list(msg.shape)} needs {expected} "
                f"values, got {len(data)}"
            )
        return cls(msg.name, msg.datatype, list(msg.shape), data)

    def to_proto(self) -> types_pb2.Tensor:
        """Encode as a message."""
        msg = types_pb2.Tensor(name=self.name, datatype=self.datatype, shape=self.shape)
        getattr(msg, contents_field(self.datatype)).extend(self.data)
        return msg

    def numpy(self) -> Any:
        """The values as a numpy array of the right dtype and shape."""
        import numpy as np

        if self.datatype == "BYTES":
            return np.array(self.data, dtype=object).reshape(self.shape)
        return np.asarray(self.data, dtype=_NUMPY_DTYPE[self.datatype]).reshape(self.shape)

    @classmethod
    def from_array(cls, name: str, array: Any) -> Tensor:
        """Build from a numpy array or torch tensor (anything with ``tolist``)."""
        if hasattr(array, "detach"):  # torch.Tensor
            array = array.detach().cpu().numpy()
        dtype = str(array.dtype)
        if dtype == "object":
            flat = [x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1)]
            return cls(name, "BYTES", list(array.shape), flat)
        try:
            datatype = _DATATYPE_BY_NUMPY[dtype]
        except KeyError:
            raise ValueError(f"output {name!r}: unsupported dtype {dtype}") from None
        return cls(name, datatype, list(array.shape), array.reshape(-1).tolist())


def as_tensor(name: str, value: Any) -> Tensor:
    """Accept a :class:`Tensor`, an array-like, or a list of str/bytes."""
    if isinstance(value, Tensor):
        return (
            value if value.name == name else Tensor(name, value.datatype, value.shape, value.data)
        )
    if isinstance(value, list) and all(isinstance(v, str | bytes) for v in value):
        data = [v.encode() if isinstance(v, str) else v for v in value]
        return Tensor(name, "BYTES", [len(data)], data)
    return Tensor.from_array(name, value)
