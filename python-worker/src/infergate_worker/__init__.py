"""infergate-worker: serve Python model classes to the infergate gateway.

An ML engineer subclasses :class:`Model`, implements ``load()`` and one batch
method, and runs ``infergate-worker serve module:Class --listen unix:/path``.
"""

from infergate_worker.context import CallContext, Cancelled, current_context
from infergate_worker.model import (
    Chunk,
    Embeddings,
    GenerateInput,
    InferInput,
    InferItem,
    InvalidInput,
    Model,
    Overloaded,
    Source,
    TensorSpec,
    Unavailable,
    run_together,
)
from infergate_worker.tensors import Tensor

__version__ = "0.1.0"

__all__ = [
    "CallContext",
    "Cancelled",
    "Chunk",
    "Embeddings",
    "GenerateInput",
    "InferInput",
    "InferItem",
    "InvalidInput",
    "Model",
    "Overloaded",
    "Source",
    "Tensor",
    "TensorSpec",
    "Unavailable",
    "__version__",
    "current_context",
    "run_together",
]
