"""The worker CLI as the gateway drives it: the start-up ``check``, JSON log
records, and the exit status of a model that cannot load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    path = [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, "-m", "infergate_worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_check_names_the_pool_and_what_it_found_and_lists_each_good_models_names():
    out = worker(
        "check",
        "echo=infergate_worker.examples.echo:Echo",
        "typo=models:Vectorz",
        "dict=models:NOT_A_MODEL",
        "cls=json:JSONDecoder",
    )
    assert out.returncode == 1
    assert json.loads(out.stdout) == {"target": "echo", "models": ["echo"]}
    errors = out.stderr.splitlines()
    assert errors[0].startswith(
        "typo: cannot import models:Vectorz: module 'models' has no attribute"
    )
    assert errors[1] == (
        "dict: models:NOT_A_MODEL is a dict object, "
        "not a subclass of infergate_worker.Model or WorkerServicer"
    )
    assert "the class json.decoder.JSONDecoder, not a subclass" in errors[2]
    assert worker("check", "echo=infergate_worker.examples.echo:Echo").returncode == 0


def test_a_model_that_cannot_load_exits_3_with_one_json_record_holding_its_traceback(tmp_path):
    out = worker(
        "serve", "models:BrokenLoad", "--listen", f"unix:{tmp_path}/w.sock", "--log-format", "json"
    )
    assert out.returncode == 3, out.stderr
    records = [json.loads(line) for line in out.stderr.splitlines()]
    failed = [r for r in records if r.get("event") == "load_failed"]
    assert len(failed) == 1, records
    (record,) = failed
    assert record["level"] == "ERROR"
    assert record["model"] == "broken"
    assert record["message"] == (
        "broken failed to load: FileNotFoundError: weights.bin: no such file"
    )
    assert record["traceback"].startswith("Traceback (most recent call last):")
    assert "raise FileNotFoundError" in record["traceback"]
    # Every line it wrote is a record: no bare traceback lines.
    assert all(isinstance(r, dict) and "level" in r for r in records)
