"""The per-call context model code sees: deadline, cancellation, request id
and W3C trace context."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

#: A cancellation this close to the deadline is the deadline's (seconds).
_DEADLINE_SLACK = 0.02


class Cancelled(Exception):
    """Raised by :meth:`CallContext.check` when the call is over for the caller.

    ``reason`` is ``"cancelled"`` (the caller went away) or ``"deadline"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"call {reason}")
        self.reason = reason


@dataclass
class CallContext:
    """What model code may ask about the call it is serving.

    Model methods run on a worker thread; they can poll :meth:`check` (or
    :attr:`cancelled`) between steps to stop early when the gateway cancels
    the call or its deadline passes.
    """

    request_id: str = ""
    #: The model the call is for (set by the runner; ``""`` outside a call).
    model: str = ""
    #: The gateway's span as a W3C ``traceparent`` (``00-<trace>-<span>-<flags>``).
    traceparent: str = ""
    #: Absolute deadline on the ``time.monotonic()`` clock, or ``None``.
    deadline: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    #: Seconds the call waited for a model thread / ran model code, so far.
    queue_time: float = field(default=0.0, repr=False)
    inference_time: float = field(default=0.0, repr=False)
    #: Batches of this call that failed as a whole and were run item by item.
    batch_splits: int = field(default=0, repr=False)
    #: Whether the worker has logged this call's cancellation.
    _cancel_logged: bool = field(default=False, repr=False)
    #: When model code last asked whether to stop (``time.monotonic()``).
    _polled_at: float | None = field(default=None, repr=False)

    @property
    def trace_id(self) -> str:
        """The trace id of :attr:`traceparent` (32 hex digits), or ``""``."""
        parts = self.traceparent.split("-")
        return parts[1] if len(parts) >= 4 and len(parts[1]) == 32 else ""

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled the call."""
        self._polled_at = time.monotonic()
        return self._cancel.is_set()

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (negative when past), or None."""
        now = time.monotonic()
        self._polled_at = now
        if self.deadline is None:
            return None
        return self.deadline - now

    def polled_since(self, when: float) -> bool:
        """Whether model code asked whether to stop at ``when`` or later."""
        return self._polled_at is not None and self._polled_at >= when

    def check(self) -> None:
        """Raise :class:`Cancelled` when the call was cancelled or timed out."""
        remaining = self.time_remaining()
        if self._cancel.is_set():
            # The gateway cancels a call when its deadline passes; that
            # cancellation may land a hair before this clock's deadline.
            near = remaining is not None and remaining <= _DEADLINE_SLACK
            raise Cancelled("deadline" if near else "cancelled")
        if remaining is not None and remaining <= 0:
            raise Cancelled("deadline")

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking (and raising) on cancellation."""
        remaining = self.time_remaining()
        if remaining is not None:
            seconds = min(seconds, max(remaining, 0.0))
        self._cancel.wait(seconds)
        self.check()

    def cancel(self) -> None:
        """Mark the call cancelled (done by the server, not by model code)."""
        self._cancel.set()


_CURRENT: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "infergate_call", default=None
)


def current_context() -> CallContext:
    """The context of the call the current thread is serving.

    Outside a call (e.g. in ``load()``) this is an empty context that never
    cancels.
    """
    ctx = _CURRENT.get()
    return ctx if ctx is not None else CallContext()


@contextlib.contextmanager
def use_context(ctx: CallContext) -> Iterator[CallContext]:
    """Make ``ctx`` the current context of this thread for the block."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
