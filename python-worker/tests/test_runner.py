"""ModelRunner: a model's calls run with their context and no gRPC; class
loading that fails says why with an ImportError."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from messages import echo_item

from infergate.v1 import types_pb2, worker_pb2
from infergate_worker import cli
from infergate_worker.codec import timings
from infergate_worker.context import CallContext
from infergate_worker.examples.echo import Echo
from infergate_worker.loader import load_target
from infergate_worker.runner import CallFailed, ModelRunner, Status


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    model = Echo()
    model.load()
    return ModelRunner([model], ThreadPoolExecutor(2))


def test_a_runner_answers_each_item_and_keeps_the_calls_timings(runner: ModelRunner):
    request = worker_pb2.InferBatchRequest(
        model="echo", items=[echo_item({"delay_ms": 20}, x=[1.0, 2.0]), echo_item({"fail": True})]
    )
    ctx = CallContext(request_id="r1")
    response = asyncio.run(runner.infer(request, ctx))
    assert list(response.results[0].outputs.tensors[0].fp32_contents) == [1.0, 2.0]
    assert response.results[1].error.code == types_pb2.ItemError.CODE_MODEL_ERROR
    assert ctx.inference_time >= 0.02


def test_a_whole_call_fails_with_a_status_not_a_grpc_abort(runner: ModelRunner):
    with pytest.raises(CallFailed) as missing:
        asyncio.run(runner.infer(worker_pb2.InferBatchRequest(model="nope"), CallContext()))
    assert missing.value.status == Status.NOT_FOUND

    late = CallContext(deadline=time.monotonic() + 0.05)
    request = worker_pb2.InferBatchRequest(model="echo", items=[echo_item({"delay_ms": 2000})])
    started = time.monotonic()
    with pytest.raises(CallFailed) as expired:
        asyncio.run(runner.infer(request, late))
    assert expired.value.status == Status.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.0, "the model stopped at the deadline"


def test_a_generation_closed_early_stops_the_model(runner: ModelRunner):
    words = " ".join(f"w{i}" for i in range(50))
    request = types_pb2.GenerateRequest(
        model="echo", messages=[types_pb2.ChatMessage(role="user", content=words)]
    )
    ctx = CallContext()

    async def first_then_leave() -> str:
        stream = runner.generate(request, ctx)
        first = await stream.__anext__()
        await stream.aclose()  # type: ignore[attr-defined]
        return first.text

    assert asyncio.run(first_then_leave()) == "w0"
    assert ctx.cancelled


def test_the_runner_needs_no_grpc():
    code = "import sys, infergate_worker.runner; print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("no_colon", "expected module:Class"),
        ("no_such_module_here:Model", "cannot import no_such_module_here:Model"),
        ("infergate_worker.examples.echo:Missing", "cannot import"),
        (
            "infergate_worker.tensors:READS_RAW",
            "is a bool object, not a subclass of infergate_worker.Model",
        ),
    ],
)
def test_a_class_that_cannot_be_loaded_is_an_import_error_the_cli_exits_with(spec: str, why: str):
    with pytest.raises(ImportError, match=why):
        load_target(spec)
    with pytest.raises(SystemExit, match=why):
        cli.main(["serve", spec, "--listen", "unix:/nonexistent/worker.sock"])


def test_a_batch_that_fails_whole_is_run_item_by_item_so_only_bad_items_fail(runner: ModelRunner):
    # Items 1 and 3 make the whole batch raise; the others succeed alone.
    items = [echo_item({"raise": n in (1, 3)}, x=[float(n)]) for n in range(5)]
    request = worker_pb2.InferBatchRequest(model="echo", items=items)
    ctx = CallContext()
    response = asyncio.run(runner.infer(request, ctx))
    failed = [n for n, r in enumerate(response.results) if r.HasField("error")]
    assert failed == [1, 3]
    assert response.results[1].error.message == "RuntimeError: echo was asked to raise"
    answered = [r for r in response.results if r.HasField("outputs")]
    ok = [list(r.outputs.tensors[0].fp32_contents) for r in answered]
    assert ok == [[0.0], [2.0], [4.0]]
    assert ctx.batch_splits == 1
    assert ("x-infergate-batch-splits", "1") in timings(ctx)
    # A batch of one is not split: its item is the one to blame.
    alone = CallContext()
    one = worker_pb2.InferBatchRequest(model="echo", items=[echo_item({"raise": True})])
    assert asyncio.run(runner.infer(one, alone)).results[0].HasField("error")
    assert alone.batch_splits == 0


def test_outputs_that_are_not_declared_or_not_tensors_fail_their_item_as_the_models_error():
    import numpy as np

    from infergate_worker import InferInput, Model, TensorSpec

    class Sloppy(Model):
        name = "sloppy"
        max_batch_size = 8
        outputs = (TensorSpec("y", "FP32", (-1,)),)

        def infer(self, items: list[InferInput]) -> list:
            answers = {
                "ok": {"y": [1.0]},
                "str": "positive",
                "nested": {"y": object()},
                "extra": {"y": [1.0], "z": [2.0]},
                "dtype": {"y": np.array([1, 2])},
            }
            return [answers[i.id] for i in items]

    runner = ModelRunner([Sloppy()], ThreadPoolExecutor(1))
    ids = ["ok", "str", "nested", "extra", "dtype"]
    request = worker_pb2.InferBatchRequest(
        model="sloppy", items=[worker_pb2.InferItem(id=i) for i in ids]
    )
    results = asyncio.run(runner.infer(request, CallContext())).results
    assert results[0].HasField("outputs")
    errors = {i: r.error for i, r in zip(ids, results, strict=True) if r.HasField("error")}
    assert set(errors) == {"str", "nested", "extra", "dtype"}
    assert all(e.code == types_pb2.ItemError.CODE_MODEL_ERROR for e in errors.values())
    assert errors["str"].message == (
        "infer returned a str for an item, not a dict of output name -> tensor"
    )
    assert errors["nested"].message.startswith("output 'y': cannot make a tensor of a object")
    assert errors["extra"].message == "output 'z' is not one the model declares (y)"
    assert errors["dtype"].message == "output 'y' is INT64; the model declares FP32"
