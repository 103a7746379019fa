"""Conversions between the Worker contract's messages and what model code
takes and returns: model descriptions, tensor items and their results,
embedding rows, generation parameters, per-item errors. No gRPC here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from infergate.v1 import types_pb2, worker_pb2
from infergate_worker.context import CallContext, Cancelled
from infergate_worker.model import (
    Embeddings,
    GenerateInput,
    InferInput,
    InvalidInput,
    Model,
    TensorSpec,
)
from infergate_worker.tensors import Tensor, as_tensor

T = TypeVar("T")

_KINDS = {
    "embed": types_pb2.MODEL_KIND_EMBED,
    "infer": types_pb2.MODEL_KIND_INFER,
    "generate": types_pb2.MODEL_KIND_GENERATE,
}


_ItemCode = types_pb2.ItemError.Code


def describe(model: Model | type[Model]) -> types_pb2.ModelInfo:
    """The ModelInfo a model class declares (``model`` or its class)."""
    cls = model if isinstance(model, type) else type(model)
    if cls.kind not in _KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {sorted(_KINDS)}, not {cls.kind!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name is empty")
    return types_pb2.ModelInfo(
        name=cls.name,
        version=cls.version,
        kind=_KINDS[cls.kind],
        max_batch_size=max(cls.max_batch_size, 1),
        streaming=cls.streams(),
        embedding_dim=cls.embedding_dim,
        platform=cls.platform,
        inputs=[_spec(t) for t in cls.inputs],
        outputs=[_spec(t) for t in cls.outputs],
    )


def _spec(t: TensorSpec) -> types_pb2.TensorSpec:
    return types_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=list(t.shape))


def item_error(exc: BaseException) -> types_pb2.ItemError:
    """Map an exception raised or returned by model code to a per-item error."""
    if isinstance(exc, InvalidInput):
        return types_pb2.ItemError(code=_ItemCode.CODE_INVALID_INPUT, message=str(exc))
    if isinstance(exc, Cancelled):
        code = (
            _ItemCode.CODE_DEADLINE_EXCEEDED
            if exc.reason == "deadline"
            else _ItemCode.CODE_CANCELLED
        )
        return types_pb2.ItemError(code=code, message=str(exc))
    if isinstance(exc, NotImplementedError):
        return types_pb2.ItemError(code=_ItemCode.CODE_UNIMPLEMENTED, message=str(exc))
    return types_pb2.ItemError(
        code=_ItemCode.CODE_MODEL_ERROR, message=f"{type(exc).__name__}: {exc}"
    )


def timings(ctx: CallContext) -> tuple[tuple[str, str], ...]:
    """Where the call's time went, for the gateway (seconds, as text), and
    how many of its batches were split after failing whole."""
    spent = (
        ("x-infergate-queue-time", f"{ctx.queue_time:.6f}"),
        ("x-infergate-inference-time", f"{ctx.inference_time:.6f}"),
    )
    if not ctx.batch_splits:
        return spent
    return (*spent, ("x-infergate-batch-splits", str(ctx.batch_splits)))


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [items]


def finish_reason(reason: str) -> int:
    return types_pb2.FINISH_REASON_LENGTH if reason == "length" else types_pb2.FINISH_REASON_STOP


#: One text's vector (a sequence, or a row of an array) or its failure, and its tokens.
EmbedRow = tuple[Any, int]


def embed_rows(out: Any, count: int, model: str) -> list[EmbedRow]:
    """Split what ``Model.embed`` returned for ``count`` texts into rows."""
    tokens: Sequence[int] | None = None
    if isinstance(out, Embeddings):
        out, tokens = out.vectors, out.tokens
    if hasattr(out, "detach"):  # torch.Tensor
        out = out.detach().cpu().numpy()
    rows = list(out)
    if len(rows) != count:
        err = RuntimeError(f"{model}.embed returned {len(rows)} vectors for {count}")
        return [(err, 0)] * count
    return [(row, int(tokens[n]) if tokens is not None else 0) for n, row in enumerate(rows)]


def embed_result(row: Any, tokens: int) -> worker_pb2.EmbedResult:
    if isinstance(row, BaseException):
        return worker_pb2.EmbedResult(error=item_error(row), tokens=tokens)
    values = row.tolist() if hasattr(row, "tolist") else row
    return worker_pb2.EmbedResult(embedding=types_pb2.Embedding(values=values), tokens=tokens)


def param(value: types_pb2.ParamValue) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


def to_param(value: Any) -> types_pb2.ParamValue:
    if isinstance(value, bool):
        return types_pb2.ParamValue(bool_param=value)
    if isinstance(value, int):
        return types_pb2.ParamValue(int64_param=value)
    if isinstance(value, float):
        return types_pb2.ParamValue(double_param=value)
    return types_pb2.ParamValue(string_param=str(value))


def infer_item(msg: worker_pb2.InferItem) -> InferInput:
    inputs = {}
    for t in msg.inputs:
        if t.name in inputs:
            raise ValueError(f"input {t.name!r} given twice")
        inputs[t.name] = Tensor.from_proto(t)
    return InferInput(
        id=msg.id,
        inputs=inputs,
        outputs=list(msg.outputs),
        parameters={k: param(v) for k, v in msg.parameters.items()},
    )


def fill_result(
    result: worker_pb2.InferResult,
    value: Any,
    item: InferInput | None,
    declared: Sequence[TensorSpec] = (),
) -> None:
    """Encode what the model returned for ``item`` into ``result`` (an
    exception needs no item). An output that cannot be a tensor, or that is
    not one the model ``declared`` or not of its datatype, fails the item as
    the model's error (a 502 naming the output), not the caller's."""
    if isinstance(value, BaseException):
        result.error.CopyFrom(item_error(value))
        return
    assert item is not None, "a result needs the item it answers"

    def fail(message: str) -> None:
        # Replaces the outputs filled so far (one of the two).
        error = types_pb2.ItemError(code=_ItemCode.CODE_MODEL_ERROR, message=message)
        result.error.CopyFrom(error)

    if not isinstance(value, dict):
        kind = type(value).__name__
        fail(f"infer returned a {kind} for an item, not a dict of output name -> tensor")
        return
    params = value.pop("parameters", None)
    wanted = set(item.outputs)
    unknown = sorted(wanted - set(value))
    if unknown:
        names = ", ".join(map(repr, unknown))
        result.error.CopyFrom(item_error(InvalidInput(f"no output named {names}")))
        return
    specs = {s.name: s for s in declared}
    outputs = result.outputs
    outputs.SetInParent()
    for name, v in value.items():
        if wanted and name not in wanted:
            continue
        spec = specs.get(name)
        if specs and spec is None:
            fail(f"output {name!r} is not one the model declares ({', '.join(specs)})")
            return
        try:
            tensor = as_tensor(name, v, spec.datatype if spec is not None else "")
        except (TypeError, ValueError, AttributeError) as exc:
            fail(f"output {name!r}: cannot make a tensor of a {type(v).__name__} ({exc})")
            return
        if spec is not None and spec.datatype and tensor.datatype != spec.datatype:
            fail(f"output {name!r} is {tensor.datatype}; the model declares {spec.datatype}")
            return
        tensor.fill(outputs.tensors.add())
    for k, v in (params or {}).items():
        outputs.parameters[k].CopyFrom(to_param(v))


def generate_input(request: types_pb2.GenerateRequest) -> GenerateInput:
    """What ``Model.generate`` is given for ``request``."""
    params = request.params
    return GenerateInput(
        messages=[{"role": m.role, "content": m.content} for m in request.messages],
        temperature=params.temperature if params.has_temperature else None,
        max_tokens=params.max_tokens or None,
        stop=list(params.stop),
        seed=params.seed or None,
        user=request.user,
    )
