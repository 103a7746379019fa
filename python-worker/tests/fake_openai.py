"""A local OpenAI-compatible chat server for tests of upstream modes.

It speaks the real wire protocol (``POST /v1/chat/completions``, plain JSON or
an SSE stream of ``chat.completion.chunk`` events ending in ``[DONE]``) and
answers deterministically, naming the bracketed sources it was given in the
system message, so a test can tell its answer from any other. Every request
body is kept in :attr:`FakeOpenAI.requests`.

Run alone: ``python fake_openai.py PORT``.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANSWER_PREFIX = "Upstream answer citing"


def answer_for(body: dict[str, Any]) -> str:
    """The fixed answer to a request: the sources its system message cites."""
    system = " ".join(m["content"] for m in body.get("messages", []) if m["role"] == "system")
    cited = re.findall(r"^\[([^\]\n]+)\]$", system, flags=re.MULTILINE)
    return f"{ANSWER_PREFIX} {len(cited)} sources: " + " ".join(f"[{c}]" for c in cited)


class FakeOpenAI:
    """The server on a free loopback port, on a daemon thread."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                words = answer_for(body).split(" ")
                if not body.get("stream"):
                    self._json(200, completion(body, " ".join(words)))
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for i, word in enumerate(words):
                    self._event(chunk(body, {"content": (" " if i else "") + word}, None))
                self._event(chunk(body, {}, "stop"))
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": 7, "completion_tokens": len(words)}
                    usage["total_tokens"] = usage["prompt_tokens"] + len(words)
                    self._event({**chunk(body, {}, None), "choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, payload: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def completion(body: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "fake"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def chunk(body: dict[str, Any], delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": body.get("model", "fake"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


if __name__ == "__main__":
    server = FakeOpenAI(int(sys.argv[1]))
    print(server.base_url, flush=True)
    threading.Event().wait()
