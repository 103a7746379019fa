"""The raw model loop counts what it embeds and refuses a model that drops texts."""

from __future__ import annotations

import pytest
from raw_loop import measure


class Counting:
    """Embeds each text as its length; `short` drops the last vector."""

    def __init__(self, short: bool = False) -> None:
        self.short = short
        self.calls: list[int] = []

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(len(texts))
        vectors = [[float(len(t))] for t in texts]
        return vectors[:-1] if self.short else vectors


def test_measure_counts_full_batches_and_wraps_around():
    model = Counting()
    texts = [f"text {i}" for i in range(10)]
    r = measure(model, texts, batch=4, seconds=0.05)
    # every call got a full batch, wrapping to the start when fewer remain
    assert set(model.calls) == {4}
    assert r["texts"] == 4 * (len(model.calls) - 1)  # the first call is the warm-up
    assert r["texts_per_s"] == pytest.approx(r["texts"] / r["seconds"])
    assert r["batch_size"] == 4


def test_measure_refuses_missing_vectors():
    with pytest.raises(RuntimeError, match="4 texts gave 3 vectors"):
        measure(Counting(short=True), ["a", "b", "c", "d"], batch=4, seconds=0.05)
