"""The baseline answers the same requests as infergate, with the same shapes."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

os.environ.setdefault("INFERGATE_BASELINE_MODELS", "infergate_worker.examples.echo:Echo")

from app import app


@pytest.fixture(scope="module")
def client():
    with TestClient(app) as c:
        yield c


def test_echo_infer_matches_infergate_shape(client):
    body = {
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}]
    }
    r = client.post("/v2/models/echo/infer", json=body)
    assert r.status_code == 200
    assert r.json() == {
        "model_name": "echo",
        "model_version": "1",
        "outputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}
        ],
    }


def test_errors(client):
    bad_shape = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1]}]}
    assert client.post("/v2/models/echo/infer", json=bad_shape).status_code == 400
    assert client.post("/v2/models/nope/infer", json=bad_shape).status_code == 404
    assert client.post("/v1/embeddings", json={"model": "echo", "input": "x"}).status_code == 400
    assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 422
