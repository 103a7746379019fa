"""The minilm example in process: steps in length order, cancellation between steps."""

from __future__ import annotations

import numpy as np
import pytest

from infergate_worker.context import CallContext, Cancelled, use_context
from infergate_worker.examples.minilm import MiniLM

TEXTS = [
    "a",
    "a much longer sentence about gateways, workers and the models behind them",
    "short one",
    "the quick brown fox jumps over the lazy dog",
] * 10


@pytest.fixture(scope="module")
def model() -> MiniLM:
    m = MiniLM()
    m.load()
    return m


def test_steps_in_length_order_match_one_pass_in_input_order(model: MiniLM):
    model.step_size = 16
    stepped = model.embed(TEXTS)
    model.step_size = len(TEXTS)
    try:
        whole = model.embed(TEXTS)
    finally:
        model.step_size = MiniLM.step_size
    a, b = np.asarray(stepped.vectors), np.asarray(whole.vectors)
    assert a.shape == (len(TEXTS), 384)
    cosines = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosines.min() > 0.9999, cosines.min()
    assert stepped.tokens == whole.tokens
    # Same text, same vector, wherever it sits in the batch.
    assert np.allclose(a[0], a[4], atol=1e-5) and stepped.tokens[1] > stepped.tokens[0]


def test_a_call_cancelled_during_a_step_stops_before_the_next(model: MiniLM, monkeypatch):
    ctx = CallContext()
    steps = []
    encode = model._encode

    def encode_then_cancel(texts: list[str]):
        steps.append(len(texts))
        out = encode(texts)
        ctx.cancel()  # the gateway cancels while this step runs
        return out

    monkeypatch.setattr(model, "_encode", encode_then_cancel)
    with use_context(ctx), pytest.raises(Cancelled) as exc:
        model.embed(TEXTS)
    assert exc.value.reason == "cancelled"
    assert steps == [16], "only the step under way when the call was cancelled ran"
