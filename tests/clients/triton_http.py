"""Drive a running gateway with ``tritonclient.http`` as its users do: with
the client's defaults (binary tensors both ways) and with JSON, through the
``echo`` model (FP32, FP16, INT64, UINT8, BOOL and BYTES, results compared
with numpy) and the ``sentiment`` model (BYTES in). Usage::

    python triton_http.py 127.0.0.1:8080

Prints ``ok`` and exits 0, or fails on the first mismatch.
"""

from __future__ import annotations

import sys

import numpy as np
import tritonclient.http as triton


def tensors(utf8: bool) -> dict[str, np.ndarray]:
    """Every kind of tensor; BYTES elements that are not text only when the
    request and answer are binary (JSON carries BYTES as strings)."""
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "i64": np.array([[-(2**62), 0, 2**62 + 7]], dtype=np.int64),
        "u8": np.arange(250, 256, dtype=np.uint8),
        "flags": np.array([True, False, True]),
        "words": np.array(
            [b"caf\xc3\xa9", b"", b"plain" if utf8 else b"\x00\xffraw"], dtype=np.object_
        ),
    }


def datatype(a: np.ndarray) -> str:
    return "BYTES" if a.dtype == np.object_ else triton.np_to_triton_dtype(a.dtype)


def echo(client: triton.InferenceServerClient, binary_in: bool, binary_out: bool | None) -> None:
    given = tensors(utf8=not binary_in or binary_out is False)
    inputs = []
    for name, a in given.items():
        i = triton.InferInput(name, list(a.shape), datatype(a))
        i.set_data_from_numpy(a, binary_data=binary_in)
        inputs.append(i)
    # None: the client's default, which asks for every output in binary.
    outputs = (
        None
        if binary_out is None
        else [triton.InferRequestedOutput(n, binary_data=binary_out) for n in given]
    )
    result = client.infer("echo", inputs, outputs=outputs)
    for name, a in given.items():
        got = result.as_numpy(name)
        assert got is not None, (name, result.get_response())
        assert got.shape == a.shape, (name, got.shape, a.shape)
        if a.dtype == np.object_:
            # tritonclient gives JSON BYTES back as str, binary ones as bytes.
            values = [v.encode() if isinstance(v, str) else v for v in got.ravel()]
            assert values == list(a.ravel()), (name, got)
        else:
            assert got.dtype == a.dtype, (name, got.dtype, a.dtype)
            assert np.array_equal(got, a), (name, got, a)
    wanted_binary = binary_out is not False
    for out in result.get_response()["outputs"]:
        has_size = "binary_data_size" in out.get("parameters", {})
        assert has_size == wanted_binary, out


def main(url: str) -> None:
    client = triton.InferenceServerClient(url=url)
    echo(client, binary_in=True, binary_out=None)
    echo(client, binary_in=True, binary_out=False)
    echo(client, binary_in=False, binary_out=True)

    text = np.array(
        [b"I love this, it works perfectly!", b"This is broken and I am angry."], dtype=np.object_
    )
    given = triton.InferInput("text", [2], "BYTES")
    given.set_data_from_numpy(text)
    result = client.infer("sentiment", [given])
    labels = result.as_numpy("label")
    assert list(labels) == [b"positive", b"negative"], labels
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
