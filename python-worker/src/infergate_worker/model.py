"""The class an ML engineer subclasses: one model, loaded once per process."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from infergate_worker.tensors import Tensor


class InvalidInput(ValueError):
    """The input does not fit the model (bad shape, type, name).

    Raise it from a batch method to fail the whole batch, or return an
    instance in the result list to fail one item; the gateway answers the
    caller with HTTP 400 / INVALID_ARGUMENT.
    """


class Overloaded(RuntimeError):
    """The model cannot take the call now (its bulkhead or an upstream quota
    is full), and did not start it.

    Raise it from any model method: the call fails with RESOURCE_EXHAUSTED,
    which the gateway treats as shed — retried on another worker within its
    retry budget, or answered by the route's fallback.
    """


class Unavailable(RuntimeError):
    """Something the model depends on is unavailable (an upstream provider
    failed or timed out).

    Raise it from any model method: the call fails with UNAVAILABLE, which
    counts against the pool's circuit and, before a stream's first chunk,
    sends the call to the route's fallback.
    """


@dataclass(frozen=True)
class TensorSpec:
    """An input or output a tensor model declares (shown in its metadata)."""

    name: str
    #: Open Inference Protocol data type: BOOL, INT8..INT64, UINT8..UINT64,
    #: FP16, FP32, FP64 or BYTES.
    datatype: str
    #: Shape; -1 marks a variable dimension.
    shape: tuple[int, ...]


P = TypeVar("P")
R = TypeVar("R")


def run_together(
    parsed: Sequence[P | BaseException],
    forward: Callable[[list[P]], Any],
    rows: Callable[[P], int],
    answer: Callable[[P, Any], R],
) -> list[R | BaseException]:
    """One forward pass over a batch's usable items, its rows split back per item.

    ``parsed`` holds, per item, its parsed input or the error that makes it
    unusable (an :class:`InvalidInput`, say). ``forward`` runs once over the
    usable inputs, in order, and returns something sliceable with one row per
    input row; it is not called when no item is usable. ``rows(p)`` is how many
    rows input ``p`` contributes, and ``answer(p, its_rows)`` makes that item's
    result. An unusable item's result is its error, so it fails alone.
    """
    usable = [p for p in parsed if not isinstance(p, BaseException)]
    out = forward(usable) if usable else None
    results: list[R | BaseException] = []
    at = 0
    for p in parsed:
        if isinstance(p, BaseException):
            results.append(p)
            continue
        n = rows(p)
        results.append(answer(p, out[at : at + n]))
        at += n
    return results


@dataclass
class InferInput:
    """One item of an ``infer`` batch: one caller's tensors. A ``BYTES``
    input's values are ``bytes``."""

    id: str
    inputs: dict[str, Tensor]
    #: Names of the outputs the caller wants; empty means all.
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)


#: The name :class:`InferInput` had before 0.2, the same as the contract's
#: ``infergate.v1.InferItem`` message; kept for one release.
InferItem = InferInput


@dataclass
class Embeddings:
    """What ``embed`` may return to report token counts with the vectors."""

    vectors: Sequence[Any]
    #: Tokens per text, same order as the vectors.
    tokens: Sequence[int] | None = None


@dataclass
class GenerateInput:
    """A generation request: the conversation and the sampling settings."""

    messages: list[dict[str, str]]
    temperature: float | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    user: str = ""


@dataclass
class Source:
    """A passage an answer draws on, returned to the client with the answer."""

    #: Where it comes from: a path or a URL.
    source: str
    #: The passage itself.
    text: str
    #: How close it is to the question (higher is closer).
    score: float = 0.0


@dataclass
class Chunk:
    """A generated piece of text, optionally with running token counts."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: "stop" or "length" on the final chunk; None otherwise.
    finish_reason: str | None = None
    #: Passages the answer draws on; send them once, best before the text.
    sources: list[Source] = field(default_factory=list)


class Model:
    """Base class for a model served by an infergate worker.

    Set the class attributes, implement :meth:`load` and the batch method of
    your ``kind``. Methods run on a worker thread, one batch at a time per
    thread; call :func:`infergate_worker.current_context` inside them to see
    the deadline and cancellation of the call being served.
    """

    #: The name clients use to call the model.
    name: ClassVar[str] = ""
    #: "embed", "infer" or "generate".
    kind: ClassVar[str] = "infer"
    #: Version of weights or code, reported to clients.
    version: ClassVar[str] = "1"
    #: The most items one batch call may carry.
    max_batch_size: ClassVar[int] = 1
    #: For embed models: the vector length.
    embedding_dim: ClassVar[int] = 0
    #: Label shown in model metadata.
    platform: ClassVar[str] = "python"
    #: For infer models: the tensors it takes and gives (model metadata;
    #: the gateway sizes images for an image input from it).
    inputs: ClassVar[Sequence[TensorSpec]] = ()
    outputs: ClassVar[Sequence[TensorSpec]] = ()

    def load(self) -> None:
        """Load weights; called once per process before the model serves."""

    def embed(self, texts: list[str]) -> Sequence[Any] | Embeddings:
        """Embed a batch of texts: one vector (list, array or tensor) per text.

        An element may be an exception instance to fail that text alone.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement embed")

    def infer(self, items: list[InferInput]) -> Sequence[dict[str, Any] | BaseException]:
        """Run a batch of tensor items: a dict of output name -> value per item.

        Values may be :class:`Tensor`, numpy arrays, torch tensors or lists
        of str/bytes. An element may be an exception instance to fail that
        item alone.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement infer")

    def generate(self, request: GenerateInput) -> Iterator[str | Chunk]:
        """Yield text pieces as they are produced."""
        raise NotImplementedError(f"{type(self).__name__} does not implement generate")

    @classmethod
    def streams(cls) -> bool:
        """True when the class overrides :meth:`generate`."""
        return cls.generate is not Model.generate
