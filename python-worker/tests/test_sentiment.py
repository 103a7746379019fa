"""The sentiment example in process: a deterministic head that gets plain
sentences right, per-item errors, and the metadata it declares."""

from __future__ import annotations

import numpy as np
import pytest

from infergate_worker import InferInput, InvalidInput
from infergate_worker.codec import describe
from infergate_worker.examples.sentiment import Sentiment
from infergate_worker.tensors import Tensor

HELD_OUT = {
    "This gateway is fantastic and fast!": "positive",
    "The deploy failed again and I am furious.": "negative",
    "What a lovely, helpful team.": "positive",
    "I waited an hour and nobody helped me.": "negative",
}


def texts_item(texts: list[str], id: str = "i") -> InferInput:
    data = [t.encode() for t in texts]
    return InferInput(id=id, inputs={"text": Tensor("text", "BYTES", [len(data)], data)})


@pytest.fixture(scope="module")
def model() -> Sentiment:
    m = Sentiment()
    m.load()
    return m


def test_plain_sentences_it_never_saw_are_classified(model: Sentiment):
    (out,) = model.infer([texts_item(list(HELD_OUT))])
    assert out["label"] == list(HELD_OUT.values())
    probs = out["probabilities"]
    assert probs.shape == (4, 2) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_training_is_deterministic(model: Sentiment):
    again = Sentiment()
    again.load()
    a = model.infer([texts_item(list(HELD_OUT))])[0]["probabilities"]
    b = again.infer([texts_item(list(HELD_OUT))])[0]["probabilities"]
    assert np.array_equal(a, b)


def test_a_bad_item_fails_alone_and_items_keep_their_own_texts(model: Sentiment):
    bad = InferInput(id="b", inputs={"x": Tensor("x", "FP32", [1], [1.0])})
    not_bytes = InferInput(id="n", inputs={"text": Tensor("text", "FP32", [1], [1.0])})
    first, err, err2, last = model.infer(
        [texts_item(["I love it."]), bad, not_bytes, texts_item(["I hate it.", "Awful."])]
    )
    assert first["label"] == ["positive"]
    assert isinstance(err, InvalidInput) and "'text'" in str(err)
    assert isinstance(err2, InvalidInput) and "BYTES" in str(err2)
    assert last["label"] == ["negative", "negative"]


def test_metadata_declares_its_tensors(model: Sentiment):
    info = describe(model)
    assert [(t.name, t.datatype, list(t.shape)) for t in info.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in info.outputs] == [
        ("label", "BYTES", [-1]),
        ("probabilities", "FP32", [-1, 2]),
    ]
