"""The provider adapter against a local OpenAI-compatible server: streaming,
usage, the bulkhead, and an unreachable upstream."""

from __future__ import annotations

import socket

import pytest
from fake_openai import ANSWER_PREFIX, FakeOpenAI

from infergate_worker import Chunk, GenerateInput, Overloaded, Unavailable
from infergate_worker.examples.provider import Provider

ASK = GenerateInput(messages=[{"role": "user", "content": "hello"}], max_tokens=50)


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


def provider(monkeypatch: pytest.MonkeyPatch, base_url: str, **env: str) -> Provider:
    monkeypatch.setenv("INFERGATE_PROVIDER", "openai")
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    monkeypatch.setenv("OPENAI_MODEL", "upstream-model")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    p = Provider()
    p.load()
    return p


def test_streams_the_upstream_answer_with_its_usage(server: FakeOpenAI, monkeypatch):
    p = provider(monkeypatch, server.base_url)
    out = list(p.generate(ASK))
    text = "".join(o for o in out if isinstance(o, str))
    assert text.startswith(ANSWER_PREFIX) and len([o for o in out if isinstance(o, str)]) > 1
    last = out[-1]
    assert isinstance(last, Chunk) and last.finish_reason == "stop"
    assert last.prompt_tokens == 7 and last.completion_tokens == len(text.split(" "))
    (sent,) = server.requests
    assert sent["model"] == "upstream-model"
    assert sent.get("max_completion_tokens", sent.get("max_tokens")) == 50
    assert sent["messages"] == [{"role": "user", "content": "hello"}]


def test_a_full_bulkhead_refuses_at_once_and_frees_when_a_call_ends(server, monkeypatch):
    p = provider(monkeypatch, server.base_url, INFERGATE_PROVIDER_MAX_CONCURRENCY="1")
    first = p.generate(ASK)
    next(first)  # holds the only slot while it streams
    with pytest.raises(Overloaded, match="bulkhead full"):
        next(p.generate(ASK))
    list(first)
    assert "".join(o for o in p.generate(ASK) if isinstance(o, str)).startswith(ANSWER_PREFIX)


def test_an_unreachable_upstream_is_unavailable_before_the_first_token(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = provider(monkeypatch, f"http://127.0.0.1:{port}/v1")
    with pytest.raises(Unavailable, match="openai"):
        next(p.generate(ASK))
    # The slot was given back.
    with pytest.raises(Unavailable):
        next(p.generate(ASK))
