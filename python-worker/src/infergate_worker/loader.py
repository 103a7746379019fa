"""Find the class a ``module:Class`` spec names and make an instance of it.

Used by the worker CLI (``serve`` and the gateway's start-up ``check``) and
by the gateway's embedded host; every failure is an :class:`ImportError`
that says what was wrong, for the caller to report (the CLI exits with it,
the gateway refuses to start).
"""

from __future__ import annotations

import importlib
from typing import Any

from infergate.v1 import worker_pb2_grpc
from infergate_worker.model import Model

Target = Model | worker_pb2_grpc.WorkerServicer


def find_target(spec: str) -> type[Target]:
    """Import ``module:Class`` and check it is a Model or WorkerServicer
    subclass, without making an instance (which may load nothing yet, but
    is the model author's code)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ImportError(f"expected module:Class, got {spec!r}")
    try:
        found: Any = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot import {spec}: {exc}") from exc
    if isinstance(found, type) and issubclass(found, Model | worker_pb2_grpc.WorkerServicer):
        return found
    if isinstance(found, type):
        what = f"the class {found.__module__}.{found.__qualname__}"
    else:
        what = f"a {type(found).__name__} object"
    raise ImportError(
        f"{spec} is {what}, not a subclass of infergate_worker.Model or WorkerServicer"
    )


def load_target(spec: str) -> Target:
    """Import ``module:Class`` and instantiate it (a Model or a raw servicer)."""
    return find_target(spec)()
