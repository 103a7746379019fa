"""``sentiment``: positive or negative, for each text of a BYTES tensor.

A tensor model in PyTorch: the texts are embedded with the ``minilm`` example
model and classified by a linear head (384 -> 2) that is trained at load time,
with a fixed seed, on the small labelled set shipped beside this file
(``sentiment_data.json``, 64 sentences). It is a demonstration of the Open
Inference Protocol path, not a production classifier: expect it to be right
about plainly worded sentences and unreliable beyond them.

Input ``text`` (BYTES, shape ``[n]``); outputs ``label`` (BYTES ``[n]``:
``negative`` or ``positive``) and ``probabilities`` (FP32 ``[n, 2]``, in that
order).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from infergate_worker import (
    InferInput,
    InvalidInput,
    Model,
    TensorSpec,
    current_context,
    run_together,
)
from infergate_worker.examples.minilm import MiniLM

log = logging.getLogger(__name__)

DATA = Path(__file__).with_name("sentiment_data.json")


class Sentiment(Model):
    name = "sentiment"
    kind = "infer"
    version = "1"
    max_batch_size = 64
    platform = "pytorch"
    inputs = (TensorSpec("text", "BYTES", (-1,)),)
    outputs = (TensorSpec("label", "BYTES", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2)))

    labels = ("negative", "positive")
    #: Training of the head: full-batch Adam, fixed seed.
    epochs = 300
    learning_rate = 0.05
    seed = 0

    def load(self) -> None:
        import torch

        self._torch = torch
        self._encoder = MiniLM()
        self._encoder.load()
        examples = json.loads(DATA.read_text())
        x = torch.as_tensor(self._encoder.embed([e["text"] for e in examples]).vectors)
        y = torch.tensor([e["label"] for e in examples])
        torch.manual_seed(self.seed)
        self._head = torch.nn.Linear(x.shape[1], len(self.labels))
        optimiser = torch.optim.Adam(self._head.parameters(), lr=self.learning_rate)
        for _ in range(self.epochs):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(self._head(x), y)
            loss.backward()
            optimiser.step()
        self._head.eval()
        with torch.inference_mode():
            accuracy = (self._head(x).argmax(dim=1) == y).float().mean().item()
        log.info(
            "sentiment head trained on %d examples: loss %.4f, training accuracy %.3f",
            len(examples),
            loss.item(),
            accuracy,
        )

    def infer(self, items: list[InferInput]) -> list[dict[str, Any] | BaseException]:
        torch = self._torch
        texts = [_texts(item) for item in items]
        current_context().check()

        def forward(usable: list[list[str]]) -> Any:
            # All items' texts go through the encoder together.
            vectors = torch.as_tensor(self._encoder.embed([t for ts in usable for t in ts]).vectors)
            with torch.inference_mode():
                return torch.softmax(self._head(vectors), dim=1)

        def answer(_texts: list[str], probs: Any) -> dict[str, Any]:
            labels = [self.labels[i] for i in probs.argmax(dim=1).tolist()]
            return {"label": labels, "probabilities": probs.numpy()}

        return run_together(texts, forward, len, answer)


def _texts(item: InferInput) -> list[str] | BaseException:
    """The texts of an item's ``text`` input, or the reason it is unusable."""
    tensor = item.inputs.get("text")
    if tensor is None:
        return InvalidInput(f"expected an input named 'text', got {sorted(item.inputs)}")
    if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
        return InvalidInput("input 'text' must be BYTES with shape [n]")
    try:
        texts = [v.decode() for v in tensor.data]
    except UnicodeDecodeError:
        return InvalidInput("input 'text' must hold UTF-8 text")
    if not texts:
        return InvalidInput("input 'text' is empty")
    return texts
