"""``tiny_cnn``: a small convolutional image classifier — with UNTRAINED weights.

Its weights are random (seeded, so answers are repeatable) and its ten
"classes" mean nothing. It exists to exercise the image path end to end: a
client posts a JPEG or PNG to ``/v2/models/tiny_cnn/infer``, the gateway
decodes, resizes and normalises it in Rust into the ``image`` input declared
here (FP32 ``[-1, 3, 64, 64]``), and the model sees that tensor. Replace the
network and load real weights to serve a real classifier the same way.

Outputs: ``probabilities`` (FP32 ``[n, 10]``), ``class`` (INT64 ``[n]``) and
``input_shape`` (INT64 ``[4]``, the shape of the tensor the model received).
"""

from __future__ import annotations

import logging
from typing import Any

from infergate_worker import (
    InferInput,
    InvalidInput,
    Model,
    TensorSpec,
    current_context,
    run_together,
)

log = logging.getLogger(__name__)

SIZE = 64


class TinyCNN(Model):
    name = "tiny_cnn"
    kind = "infer"
    version = "untrained-seed-0"
    max_batch_size = 16
    platform = "pytorch"
    inputs = (TensorSpec("image", "FP32", (-1, 3, SIZE, SIZE)),)
    outputs = (
        TensorSpec("probabilities", "FP32", (-1, 10)),
        TensorSpec("class", "INT64", (-1,)),
        TensorSpec("input_shape", "INT64", (4,)),
    )

    def load(self) -> None:
        import torch
        from torch import nn

        self._torch = torch
        torch.manual_seed(0)
        self._net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        ).eval()
        log.info("tiny_cnn ready (untrained weights, seed 0)")

    def infer(self, items: list[InferInput]) -> list[dict[str, Any] | BaseException]:
        torch = self._torch
        images = [self._image(item) for item in items]
        current_context().check()

        def forward(usable: list[Any]) -> Any:
            with torch.inference_mode():
                return torch.softmax(self._net(torch.cat(usable)), dim=1)

        def answer(image: Any, probs: Any) -> dict[str, Any]:
            return {
                "probabilities": probs.numpy(),
                "class": probs.argmax(dim=1).numpy(),
                "input_shape": torch.tensor(list(image.shape)).numpy(),
            }

        return run_together(images, forward, lambda image: image.shape[0], answer)

    def _image(self, item: InferInput) -> Any:
        """The item's ``image`` input as a torch tensor, or why it is unusable."""
        tensor = item.inputs.get("image")
        shape = tuple(tensor.shape) if tensor is not None else ()
        if tensor is None or tensor.datatype != "FP32" or shape[1:] != (3, SIZE, SIZE):
            return InvalidInput(f"expected input 'image' FP32 [n, 3, {SIZE}, {SIZE}]")
        return self._torch.from_numpy(tensor.numpy())
