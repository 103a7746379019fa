"""Message builders shared by the SDK tests."""

from __future__ import annotations

from infergate.v1 import types_pb2, worker_pb2
from infergate_worker.tensors import Tensor


def tensor(name: str, values: list[float]) -> types_pb2.Tensor:
    return types_pb2.Tensor(name=name, datatype="FP32", shape=[len(values)], fp32_contents=values)


def echo_item(params: dict | None = None, **tensors: list[float]) -> worker_pb2.InferItem:
    """An echo item with FP32 `tensors` and per-item `params` (bool or int)."""
    item = worker_pb2.InferItem(id="i", inputs=[tensor(k, v) for k, v in tensors.items()])
    for k, v in (params or {}).items():
        if isinstance(v, bool):
            item.parameters[k].bool_param = v
        else:
            item.parameters[k].int64_param = v
    return item


def values(t: types_pb2.Tensor) -> list:
    """A tensor message's values, whichever form (typed or raw) it came in."""
    return list(Tensor.from_proto(t).data)
