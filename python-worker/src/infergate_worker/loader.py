"""Find the class a ``module:Class`` spec names and make an instance of it.

Used by the worker CLI and by the gateway's embedded host; every failure is
an :class:`ImportError` that says what was wrong, for the caller to report
(the CLI exits with it, the gateway refuses to start).
"""

from __future__ import annotations

import importlib
from typing import Any

from infergate.v1 import worker_pb2_grpc
from infergate_worker.model import Model


def load_target(spec: str) -> Model | worker_pb2_grpc.WorkerServicer:
    """Import ``module:Class`` and instantiate it (a Model or a raw servicer)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ImportError(f"expected module:Class, got {spec!r}")
    try:
        cls: Any = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot import {spec}: {exc}") from exc
    if isinstance(cls, type) and issubclass(cls, Model | worker_pb2_grpc.WorkerServicer):
        return cls()
    raise ImportError(f"{spec} is neither an infergate_worker.Model nor a WorkerServicer subclass")
