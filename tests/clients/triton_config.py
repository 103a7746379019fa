"""Read a model's config with ``tritonclient.http`` and call it the way a
Triton client builds its request from that config. Usage::

    python triton_config.py 127.0.0.1:8080 MODEL

Prints the config as JSON and exits 0, or fails on the first mismatch.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.http as triton


def main(url: str, model: str) -> None:
    client = triton.InferenceServerClient(url=url)
    assert client.is_server_live() and client.is_model_ready(model)
    config = client.get_model_config(model)
    metadata = client.get_model_metadata(model)
    assert config["name"] == metadata["name"] == model, (config, metadata)
    assert [i["name"] for i in config["input"]] == [i["name"] for i in metadata["inputs"]], (
        config,
        metadata,
    )

    # What Triton's examples do: a batch of two along the batch dimension the
    # config leaves out of `dims` when max_batch_size > 0.
    spec = config["input"][0]
    assert spec["data_type"] == "TYPE_STRING", spec
    shape = ([2] if config["max_batch_size"] > 0 else []) + [
        2 if d == -1 else d for d in spec["dims"]
    ]
    texts = np.array(
        ["what a lovely, wonderful meal", "awful, rude and terrible"], dtype=object
    ).reshape(shape)
    given = triton.InferInput(spec["name"], list(texts.shape), "BYTES")
    given.set_data_from_numpy(texts, binary_data=False)
    wanted = [triton.InferRequestedOutput(o["name"], binary_data=False) for o in config["output"]]
    result = client.infer(model, [given], outputs=wanted)
    positive = result.as_numpy(config["output"][0]["name"])
    assert positive.shape == (2,) and positive[0] > 0.5 > positive[1], positive
    print(json.dumps(config))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
