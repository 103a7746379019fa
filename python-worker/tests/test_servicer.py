"""How the servicer ends a call that failed as a whole."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from infergate_worker.runner import CallFailed, Status
from infergate_worker.servicer import _abort


class EndedContext:
    """A call grpc already ended: sending its status fails, as
    ``ExecuteBatchError`` does when the deadline passed a moment before."""

    def __init__(self, done: bool) -> None:
        self._done = done

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError('Failed "execute_batch"')

    def done(self) -> bool:
        return self._done


class AbortingContext(EndedContext):
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise grpc.aio.AbortError(f"{code}: {details}")


def test_a_call_that_ended_before_its_status_was_sent_is_a_cancellation() -> None:
    # Its deadline passed (or its client left): no one is left to answer,
    # so it is not logged as an error by grpc.
    for status in (Status.DEADLINE_EXCEEDED, Status.CANCELLED):
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(_abort(EndedContext(done=False), CallFailed(status, "call deadline")))
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_abort(EndedContext(done=True), CallFailed(Status.INTERNAL, "boom")))
    # A failure to send the status of a live call is still an error.
    with pytest.raises(RuntimeError):
        asyncio.run(_abort(EndedContext(done=False), CallFailed(Status.INTERNAL, "boom")))
    # And a call that is aborted as usual ends the usual way.
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(_abort(AbortingContext(done=False), CallFailed(Status.NOT_FOUND, "no model")))
