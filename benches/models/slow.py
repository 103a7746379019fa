"""``slow``: the echo model under another name, for a pool of its own in the
hostile bench (callers there ask it for 2 s of work)."""

from __future__ import annotations

from infergate_worker.examples.echo import Echo


class Slow(Echo):
    name = "slow"
