"""The OpenAI Batch API through the official ``openai`` package, as a user
of the SDK would drive it: upload a JSONL file (a malformed one is refused,
its bad lines named), create a batch, poll it to completed, read the output
file. Every custom_id is answered once, with what the synchronous call
answers. Another tenant sees none of it.

Usage: openai_batch.py BASE_URL KEY OTHER_KEY; prints ``ok``.
"""

from __future__ import annotations

import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
from openai import OpenAI

N = 1000


def jsonl(lines: list[dict]) -> io.BytesIO:
    return io.BytesIO("\n".join(json.dumps(line) for line in lines).encode())


def run_batch(client: OpenAI, lines: list[dict], endpoint: str) -> tuple[Any, Any, dict[str, Any]]:
    upload = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes > 0, upload
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint=endpoint,
        completion_window="24h",
        metadata={"suite": "e2e"},
    )
    assert batch.status in ("validating", "in_progress"), batch
    assert batch.request_counts.total == len(lines), batch
    seen = {batch.status}
    deadline = time.time() + 300
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.time() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
        seen.add(batch.status)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == len(lines), batch.request_counts
    assert batch.request_counts.failed == 0, batch.request_counts
    assert batch.metadata == {"suite": "e2e"}, batch.metadata
    assert batch.completed_at and batch.in_progress_at and batch.finalizing_at, batch
    assert batch.error_file_id is None, batch
    out = client.files.content(batch.output_file_id).text.splitlines()
    answers = {}
    for line in out:
        row = json.loads(line)
        assert row["custom_id"] not in answers, f"{row['custom_id']} answered twice"
        assert row["error"] is None and row["response"]["status_code"] == 200, row
        answers[row["custom_id"]] = row["response"]["body"]
    assert sorted(answers) == sorted(line["custom_id"] for line in lines), "custom_ids differ"
    return upload, batch, answers


def main() -> None:
    base, key, other_key = sys.argv[1:4]
    client = OpenAI(base_url=base, api_key=key, max_retries=0)
    other = OpenAI(base_url=base, api_key=other_key, max_retries=0)

    texts = [f"document {i}: the queue drains what a burst left" for i in range(N)]
    lines = [
        {
            "custom_id": f"doc-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "minilm", "input": text},
        }
        for i, text in enumerate(texts)
    ]
    malformed = [
        "{this is not json",
        json.dumps(
            {
                "custom_id": "doc-0",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "minilm", "input": "x"},
            }
        ),
        json.dumps(
            {
                "custom_id": "late",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"input": "x"},
            }
        ),
    ]
    bad = io.BytesIO(
        ("\n".join(json.dumps(line) for line in lines) + "\n" + "\n".join(malformed)).encode()
    )
    try:
        client.files.create(file=("bad.jsonl", bad), purpose="batch")
        raise AssertionError("a file with malformed lines was accepted")
    except openai.BadRequestError as e:
        message = str(e)
        for n in (N + 1, N + 2, N + 3):
            assert f"line {n}:" in message, message
        assert "line 1:" not in message, message

    upload, batch, answers = run_batch(client, lines, "/v1/embeddings")

    # The synchronous call's vectors (past the cache, which the batch filled).
    def sync(i: int) -> list[float]:
        got = client.embeddings.create(
            model="minilm", input=texts[i], extra_headers={"Cache-Control": "no-cache"}
        )
        return got.data[0].embedding

    with ThreadPoolExecutor(8) as pool:
        expected = list(pool.map(sync, range(N)))
    for i, want in enumerate(expected):
        got = answers[f"doc-{i}"]["data"][0]["embedding"]
        assert len(got) == len(want), (len(got), len(want))
        worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
        assert worst < 1e-5, f"doc-{i}: vectors differ by {worst}"

    chat = [
        {
            "custom_id": f"chat-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "echo",
                "messages": [{"role": "user", "content": f"say {i} back"}],
            },
        }
        for i in range(20)
    ]
    _, chat_batch, chat_answers = run_batch(client, chat, "/v1/chat/completions")
    for i in range(20):
        want = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": f"say {i} back"}]
        )
        got = chat_answers[f"chat-{i}"]
        assert got["choices"][0]["message"]["content"] == want.choices[0].message.content, got

    # The other tenant finds none of it.
    for call in (
        lambda: other.files.retrieve(upload.id),
        lambda: other.files.content(batch.output_file_id),
        lambda: other.batches.retrieve(batch.id),
        lambda: other.batches.cancel(chat_batch.id),
        lambda: other.files.delete(upload.id),
    ):
        try:
            call()
            raise AssertionError("another tenant reached a batch or file")
        except openai.NotFoundError:
            pass
    assert batch.id not in [b.id for b in other.batches.list().data]
    assert upload.id not in [f.id for f in other.files.list().data]
    listed = [b.id for b in client.batches.list(limit=1).data]
    assert listed == [chat_batch.id], listed
    page = client.batches.list(limit=1, after=chat_batch.id).data
    assert [b.id for b in page] == [batch.id], page

    assert client.files.delete(upload.id).deleted
    try:
        client.files.retrieve(upload.id)
        raise AssertionError("a deleted file is still there")
    except openai.NotFoundError:
        pass
    print("ok")


if __name__ == "__main__":
    main()
