"""The rag example in process: retrieval, the extractive answer, and the
upstream mode against a local OpenAI-compatible server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openai import ANSWER_PREFIX, FakeOpenAI

from infergate_worker import Chunk, GenerateInput
from infergate_worker.context import CallContext, Cancelled, use_context
from infergate_worker.examples.rag import EXTRACTIVE_PREAMBLE, Rag

GATEWAY = """# Gateway

The gateway routes each request to a pool of workers.
Canary releases send ten percent of the traffic to the new version of a model.
"""
BREAD = """# Bread

Bread needs flour, water, salt and yeast.
Bake the loaf at two hundred degrees for forty minutes.
"""


@pytest.fixture(scope="module")
def rag(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rag]:
    docs = tmp_path_factory.mktemp("rag") / "docs"
    (docs / "kitchen").mkdir(parents=True)
    (docs / "gateway.md").write_text(GATEWAY)
    (docs / "kitchen" / "bread.md").write_text(BREAD)
    os.environ["INFERGATE_RAG_DOCS"] = str(docs)
    os.environ.pop("OPENAI_BASE_URL", None)
    try:
        model = Rag()
        model.load()
        yield model
    finally:
        del os.environ["INFERGATE_RAG_DOCS"]


def ask(model: Rag, question: str) -> tuple[str, list[Chunk]]:
    out = list(model.generate(GenerateInput(messages=[{"role": "user", "content": question}])))
    text = "".join(o if isinstance(o, str) else o.text for o in out)
    return text, [o for o in out if isinstance(o, Chunk)]


def test_extractive_answer_quotes_the_closest_sentence_with_its_source(rag: Rag):
    text, chunks = ask(rag, "How long should the bread bake?")
    sources = chunks[0].sources
    assert sources, "sources come first, before the text"
    assert sources[0].source == "docs/kitchen/bread.md:1", [s.source for s in sources]
    assert sources[0].score > sources[-1].score
    assert text.startswith(EXTRACTIVE_PREAMBLE)
    first = text[len(EXTRACTIVE_PREAMBLE) :].strip().splitlines()[0]
    quote = "Bake the loaf at two hundred degrees for forty minutes."
    assert first == f"- {quote} [docs/kitchen/bread.md:1]"
    assert chunks[-1].finish_reason == "stop"


def test_the_other_document_answers_the_other_question(rag: Rag):
    text, chunks = ask(rag, "What share of traffic does a canary get?")
    assert chunks[0].sources[0].source.startswith("docs/gateway.md")
    assert "ten percent" in text.splitlines()[2]


def test_a_cancelled_call_stops_between_quoted_sentences(rag: Rag):
    ctx = CallContext()
    request = GenerateInput(messages=[{"role": "user", "content": "bread"}])
    with use_context(ctx):
        it = rag.generate(request)
        next(it)  # the sources
        next(it)  # the preamble
        ctx.cancel()
        with pytest.raises(Cancelled):
            next(it)


def test_upstream_mode_streams_the_provider_answer_grounded_in_the_retrieved_pieces(
    rag: Rag, monkeypatch: pytest.MonkeyPatch
):
    server = FakeOpenAI()
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_MODEL", "local-test-model")
        monkeypatch.setattr(rag, "_llm", rag._chat_model())
        text, chunks = ask(rag, "How long should the bread bake?")
    finally:
        server.close()
    assert text.startswith(ANSWER_PREFIX), text
    assert "[docs/kitchen/bread.md:1]" in text
    (request,) = server.requests
    assert request["model"] == "local-test-model" and request["stream"] is True
    system = request["messages"][0]
    assert system["role"] == "system" and "Bake the loaf" in system["content"]
    assert request["messages"][-1] == {"role": "user", "content": "How long should the bread bake?"}
    assert chunks[0].sources and chunks[-1].finish_reason == "stop"


def test_no_documents_is_a_clear_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("INFERGATE_RAG_DOCS", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="no documents to index"):
        Rag().load()
