"""``echo``: returns its inputs; no dependencies. Useful for tests and wiring.

Request parameters it understands (per item):
- ``delay_ms``: work that long first, stopping early on cancellation;
- ``fail``: true fails this item with a model error;
- ``raise``: true makes the whole call raise (the SDK then runs its batch
  item by item, so only the items that asked to raise fail).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from infergate_worker import (
    Cancelled,
    Chunk,
    GenerateInput,
    InferInput,
    Model,
    current_context,
)

log = logging.getLogger(__name__)


class Echo(Model):
    name = "echo"
    kind = "infer"
    version = "1"
    max_batch_size = 64
    platform = "python"

    #: Pause between generated words, so streaming is observable.
    word_delay_s = 0.01

    def load(self) -> None:
        log.info("echo loaded")

    def infer(self, items: list[InferInput]) -> list[dict[str, Any] | BaseException]:
        ctx = current_context()
        delay_ms = max((int(i.parameters.get("delay_ms", 0)) for i in items), default=0)
        if delay_ms:
            try:
                ctx.wait(delay_ms / 1000)
            except Cancelled as exc:
                log.warning(
                    "echo stopped early (%s) during %d ms of asked-for work", exc.reason, delay_ms
                )
                raise
        if any(i.parameters.get("raise") for i in items):
            raise RuntimeError("echo was asked to raise")
        results: list[dict[str, Any] | BaseException] = []
        for item in items:
            if item.parameters.get("fail"):
                results.append(RuntimeError("echo was asked to fail this item"))
            else:
                results.append(dict(item.inputs))
        return results

    def generate(self, request: GenerateInput) -> Iterator[str | Chunk]:
        ctx = current_context()
        last = request.messages[-1]["content"] if request.messages else ""
        words = last.split()
        limit = request.max_tokens or len(words)
        for n, word in enumerate(words[:limit]):
            ctx.wait(self.word_delay_s)
            yield (" " if n else "") + word
        reason = "length" if limit < len(words) else "stop"
        # A word is a token here, the prompt's being every message's.
        prompt = sum(len(m["content"].split()) for m in request.messages)
        yield Chunk(
            "", prompt_tokens=prompt, completion_tokens=min(limit, len(words)), finish_reason=reason
        )
