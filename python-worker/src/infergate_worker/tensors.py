"""Conversion between ``infergate.v1.Tensor`` messages and Python values.

The SDK does not need numpy; :meth:`Tensor.numpy` imports it on demand, and
numpy arrays or torch tensors returned by models are converted by duck typing.

Numeric tensors travel raw where they can (``Tensor.raw_contents``: the
values' little-endian bytes): their ``data`` is then a typed ``memoryview``
over those bytes, read without a Python object per value, and an array a
model returns goes back the same way. A million FP32 values cost ~230 ms of
the event loop as Python floats, well under 1 ms raw.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence
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

#: ``memoryview`` formats of the datatypes that travel raw; FP16 and BYTES do not.
_RAW_FORMAT = {
    "BOOL": "?",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "FP32": "f",
    "FP64": "d",
}

#: Raw contents are little endian; this host reads them in place.
READS_RAW = sys.byteorder == "little"


def contents_field(datatype: str) -> str:
    """The ``Tensor`` field that holds values of ``datatype``."""
    try:
        return _FIELD_BY_TYPE[datatype]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r}") from None


@dataclass
class Tensor:
    """A named tensor: flat row-major ``data`` with a ``shape``.

    ``data`` is a list, or for a tensor that came raw a read-only typed
    ``memoryview`` (indexable, iterable, ``tolist()``); :meth:`numpy` reads
    either without a Python object per value. A ``BYTES`` tensor's values
    arrive as ``bytes`` (decode text with ``.decode()``); one you build may
    hold ``str`` too, sent UTF-8 encoded.
    """

    name: str
    datatype: str
    shape: list[int]
    data: Sequence[Any]

    @classmethod
    def from_proto(cls, msg: types_pb2.Tensor) -> Tensor:
        """Decode a message, checking that the element count fits the shape."""
        field = contents_field(msg.datatype)
        raw = msg.raw_contents
        if raw:
            data: Sequence[Any] = _raw_view(msg.name, msg.datatype, raw)
            if len(getattr(msg, field)):
                raise ValueError(f"tensor {msg.name!r}: raw_contents and {field} are both filled")
        else:
            data = list(getattr(msg, field))
        expected = math.prod(msg.shape)
        if expected != len(data):
            raise ValueError(
                f"tensor {msg.name!r}: shape {list(msg.shape)} needs {expected} "
                f"values, got {len(data)}"
            )
        return cls(msg.name, msg.datatype, list(msg.shape), data)

    def to_proto(self) -> types_pb2.Tensor:
        """Encode as a message: raw when ``data`` is a memoryview of the
        datatype's own format, else value by value."""
        return self.fill(types_pb2.Tensor())

    def fill(self, msg: types_pb2.Tensor) -> types_pb2.Tensor:
        """Encode into ``msg`` (e.g. one just added to a response: copying a
        large message into another costs more than encoding it)."""
        msg.name, msg.datatype = self.name, self.datatype
        msg.shape.extend(self.shape)
        data = self.data
        if isinstance(data, memoryview):
            if READS_RAW and data.format == _RAW_FORMAT.get(self.datatype):
                msg.raw_contents = _whole_bytes(data)
                return msg
            data = data.tolist()
        if self.datatype == "BYTES":
            data = [v.encode() if isinstance(v, str) else v for v in data]
        getattr(msg, contents_field(self.datatype)).extend(data)
        return msg

    def numpy(self) -> Any:
        """The values as a (writable) numpy array of the right dtype and shape."""
        import numpy as np

        if self.datatype == "BYTES":
            return np.array(self.data, dtype=object).reshape(self.shape)
        dtype = _NUMPY_DTYPE[self.datatype]
        if isinstance(self.data, memoryview):
            return np.frombuffer(self.data, dtype=dtype).reshape(self.shape).copy()
        return np.asarray(self.data, dtype=dtype).reshape(self.shape)

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
        fmt = _RAW_FORMAT.get(datatype)
        if fmt is None or not READS_RAW:
            return cls(name, datatype, list(array.shape), array.reshape(-1).tolist())
        # One row-major copy as bytes, viewed in the datatype's own format
        # (numpy names int64 "l" where the raw form says "q"); encoding then
        # hands those bytes on without another copy.
        raw = array.tobytes()
        return cls(name, datatype, list(array.shape), memoryview(raw).cast(fmt))


def _raw_view(name: str, datatype: str, raw: bytes) -> memoryview:
    """``raw`` as a typed view of ``datatype`` values."""
    fmt = _RAW_FORMAT.get(datatype)
    if fmt is None:
        raise ValueError(f"tensor {name!r}: {datatype} values cannot come in raw_contents")
    if not READS_RAW:
        raise ValueError(f"tensor {name!r}: raw_contents need a little-endian host")
    width = struct.calcsize(fmt)
    if len(raw) % width:
        raise ValueError(
            f"tensor {name!r}: raw_contents holds {len(raw)} bytes, not a whole number "
            f"of {width}-byte {datatype} values"
        )
    return memoryview(raw).cast(fmt)


def _whole_bytes(view: memoryview) -> bytes:
    """``view``'s bytes: the object it views where that is a whole ``bytes``
    (a raw input echoed back, an array's ``tobytes``), else a copy. A 4 MB
    copy costs about a millisecond of the event loop."""
    obj = view.obj
    if isinstance(obj, bytes) and view.c_contiguous and view.nbytes == len(obj):
        return obj
    return view.tobytes()


def as_tensor(name: str, value: Any, datatype: str = "") -> Tensor:
    """Accept a :class:`Tensor`, an array (numpy, torch), or a (nested) list
    of numbers, str or bytes. A list takes ``datatype`` (the output's
    declared one) when given: Python floats would otherwise be FP64."""
    if isinstance(value, Tensor):
        return (
            value if value.name == name else Tensor(name, value.datatype, value.shape, value.data)
        )
    if isinstance(value, list | tuple):
        if all(isinstance(v, str | bytes) for v in value):
            data = [v.encode() if isinstance(v, str) else v for v in value]
            return Tensor(name, "BYTES", [len(data)], data)
        import numpy as np

        dtype = _NUMPY_DTYPE.get(datatype) if datatype != "BYTES" else None
        value = np.asarray(value, dtype=dtype)
    return Tensor.from_array(name, value)
