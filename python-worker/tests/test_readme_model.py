"""The README's "Serving your own model" example, served as written."""

from __future__ import annotations

import re
from pathlib import Path

from grpc_health.v1 import health_pb2
from messages import tensor, values

from infergate.v1 import types_pb2, worker_pb2

README = Path(__file__).resolve().parents[2] / "README.md"
SERVING = health_pb2.HealthCheckResponse.SERVING


def test_the_readme_model_serves_a_batch_with_a_bad_item(spawn, tmp_path: Path):
    code = re.search(r"```python\n(# mymodels\.py\n.*?)```", README.read_text(), re.S)
    assert code, "README lost its mymodels.py example"
    (tmp_path / "mymodels.py").write_text(code.group(1))
    w = spawn("mymodels:Doubler", env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).parent}"})
    w.wait_status("doubler", SERVING)

    items = [
        worker_pb2.InferItem(id="a", inputs=[tensor("x", [1.0, 2.0])]),
        worker_pb2.InferItem(id="b", inputs=[tensor("z", [5.0])]),
        worker_pb2.InferItem(id="c", inputs=[tensor("x", [3.0])]),
    ]
    resp = w.stub.Infer(worker_pb2.InferBatchRequest(model="doubler", items=items), timeout=10)

    first, bad, last = resp.results
    assert [(t.name, values(t)) for t in first.outputs.tensors] == [("y", [2.0, 4.0])]
    assert [(t.name, values(t)) for t in last.outputs.tensors] == [("y", [6.0])]
    assert bad.error.code == types_pb2.ItemError.Code.CODE_INVALID_INPUT
    assert "input 'x' is required" in bad.error.message
