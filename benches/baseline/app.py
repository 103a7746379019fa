"""The FastAPI baseline: the same model classes as the infergate workers,
served in-process the way a competent team would write it.

Run (what the bench scenarios do):

    uvicorn app:app --app-dir benches/baseline --host 127.0.0.1 --port 8090 \\
        --workers 2 --loop uvloop --http httptools --no-access-log

Choices, so the comparison is fair and documented:
- one uvicorn worker process per core, uvloop and httptools (the fast stack);
- endpoints are plain ``def`` functions, so FastAPI runs model calls in its
  thread pool and the event loop stays free - the idiomatic FastAPI way;
- each request is one model call with that request's inputs: no batching
  across requests, no caching (a team writing this service would not add
  either without building what infergate is);
- the same routes and JSON shapes as infergate (``/v1/embeddings``,
  ``/v2/models/{model}/infer``), validated, with 400/404 errors.

``INFERGATE_BASELINE_MODELS`` lists the ``module:Class`` to serve
(default: MiniLM and Echo).
"""

from __future__ import annotations

import importlib
import os
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from infergate_worker import Embeddings, InferItem, InvalidInput, Model, Tensor
from infergate_worker.tensors import as_tensor

DEFAULT_MODELS = "infergate_worker.examples.minilm:MiniLM,infergate_worker.examples.echo:Echo"
MODELS: dict[str, Model] = {}


def load_models(spec: str) -> dict[str, Model]:
    """Import, instantiate and load each ``module:Class``."""
    models = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        module, _, cls = item.partition(":")
        model = getattr(importlib.import_module(module), cls)()
        model.load()
        models[type(model).name] = model
    return models


@asynccontextmanager
async def lifespan(_: FastAPI) -> Any:
    MODELS.update(load_models(os.environ.get("INFERGATE_BASELINE_MODELS", DEFAULT_MODELS)))
    yield
    MODELS.clear()


app = FastAPI(lifespan=lifespan)


class EmbeddingsRequest(BaseModel):
    model: str
    input: str | list[str]
    encoding_format: str | None = None


class TensorIn(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorIn]
    outputs: list[dict[str, Any]] | None = None


def _model(name: str, kind: str) -> Model:
    model = MODELS.get(name)
    if model is None:
        raise HTTPException(404, f"model {name!r} not found")
    if type(model).kind != kind:
        raise HTTPException(400, f"model {name!r} does not support {kind}")
    return model


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in data:
        out.extend(_flatten(v) if isinstance(v, list) else [v])
    return out


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/embeddings")
def embeddings(req: EmbeddingsRequest) -> dict[str, Any]:
    model = _model(req.model, "embed")
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
        raise HTTPException(400, "input must not be empty")
    out = model.embed(texts)
    vectors, tokens = (out.vectors, out.tokens) if isinstance(out, Embeddings) else (out, None)
    rows = vectors.tolist() if hasattr(vectors, "tolist") else list(vectors)
    used = int(sum(tokens)) if tokens is not None else 0
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)],
        "model": req.model,
        "usage": {"prompt_tokens": used, "total_tokens": used},
    }


@app.post("/v2/models/{name}/infer")
def infer(name: str, req: InferRequest) -> dict[str, Any]:
    model = _model(name, "infer")
    try:
        tensors = {
            t.name: Tensor.from_proto(
                Tensor(t.name, t.datatype, t.shape, _flatten(t.data)).to_proto()
            )
            for t in req.inputs
        }
    except (ValueError, TypeError) as exc:
        raise HTTPException(400, str(exc)) from exc
    wanted = [o["name"] for o in req.outputs or [] if "name" in o]
    item = InferItem(
        id=req.id or "", inputs=tensors, outputs=wanted, parameters=req.parameters or {}
    )
    (result,) = model.infer([item])
    if isinstance(result, InvalidInput):
        raise HTTPException(400, str(result))
    if isinstance(result, BaseException):
        raise HTTPException(502, f"{type(result).__name__}: {result}")
    outputs = []
    for out_name, value in result.items():
        if wanted and out_name not in wanted:
            continue
        t = as_tensor(out_name, value)
        data = [v.decode() for v in t.data] if t.datatype == "BYTES" else t.data
        outputs.append({"name": out_name, "datatype": t.datatype, "shape": t.shape, "data": data})
    body: dict[str, Any] = {
        "model_name": name,
        "model_version": type(model).version,
        "outputs": outputs,
    }
    if req.id:
        body["id"] = req.id
    return body
