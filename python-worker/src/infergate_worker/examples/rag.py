"""``rag``: answers questions about a folder of documents, with LangChain.

At load time it reads the documents (``INFERGATE_RAG_DOCS``: files or folders
separated by ``os.pathsep``; default: this project's ``README.md`` and
``docs/``), splits them with LangChain's Markdown-aware text splitter, embeds
the pieces with the ``minilm`` example model, and keeps them in LangChain's
in-memory vector store.

For each question (the last user message) it retrieves the ``top_k`` closest
pieces, sends them to the client as sources, and answers:

- when ``OPENAI_BASE_URL`` is set, through LangChain's OpenAI-compatible chat
  model (vLLM, Ollama, or a hosted provider; ``OPENAI_API_KEY`` and
  ``OPENAI_MODEL`` as usual), streaming its tokens and grounded in the
  retrieved pieces;
- otherwise with a built-in extractive answerer that streams the retrieved
  sentences closest to the question, each with its source. It says so: no
  language model is involved and no text is invented.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

from infergate_worker import Chunk, GenerateInput, Model, Source, current_context
from infergate_worker.examples.minilm import MiniLM

log = logging.getLogger(__name__)

#: The repository root when the package is installed from a checkout.
_REPO = Path(__file__).resolve().parents[4]
_SUFFIXES = {".md", ".txt", ".rst"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n|\n(?=\s*[-*|#])")

EXTRACTIVE_PREAMBLE = (
    "Extractive answer (no language model is configured): the passages of the "
    "indexed documents closest to the question.\n"
)


def default_paths() -> list[Path]:
    """``INFERGATE_RAG_DOCS``, or the project's README and docs folder."""
    configured = os.environ.get("INFERGATE_RAG_DOCS", "")
    if configured:
        return [Path(p) for p in configured.split(os.pathsep) if p]
    return [_REPO / "README.md", _REPO / "docs"]


def read_documents(paths: list[Path]) -> list[tuple[str, str]]:
    """``(name, text)`` of every document file under ``paths``, sorted."""
    files: list[tuple[Path, Path]] = []
    for path in paths:
        if path.is_dir():
            files += [(f, path.parent) for f in sorted(path.rglob("*")) if f.suffix in _SUFFIXES]
        elif path.is_file():
            files.append((path, path.parent))
    return [(str(f.relative_to(base)), f.read_text(encoding="utf-8")) for f, base in files]


class MiniLMEmbeddings(Embeddings):
    """LangChain ``Embeddings`` over the ``minilm`` example model."""

    def __init__(self, model: MiniLM) -> None:
        self._model = model

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [list(map(float, v)) for v in self._model.embed(texts).vectors]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class Rag(Model):
    name = "rag"
    kind = "generate"
    version = "1"
    max_batch_size = 1
    platform = "langchain"

    #: Pieces retrieved per question.
    top_k = 4
    #: Sentences the extractive answerer quotes.
    quote = 3
    #: Characters per piece (and overlap) for the splitter.
    chunk_size = 900
    chunk_overlap = 120

    def load(self) -> None:
        documents = read_documents(default_paths())
        if not documents:
            where = ", ".join(map(str, default_paths()))
            raise RuntimeError(f"no documents to index under {where} (set INFERGATE_RAG_DOCS)")
        self._minilm = MiniLM()
        self._minilm.load()
        self._embeddings = MiniLMEmbeddings(self._minilm)
        splitter = RecursiveCharacterTextSplitter.from_language(
            Language.MARKDOWN,
            chunk_size=self.chunk_size,
            chunk_overlap=self.chunk_overlap,
            add_start_index=True,
        )
        pieces: list[Document] = []
        for name, text in documents:
            for piece in splitter.create_documents([text], metadatas=[{"name": name}]):
                line = text.count("\n", 0, piece.metadata["start_index"]) + 1
                piece.metadata["source"] = f"{name}:{line}"
                pieces.append(piece)
        self._store = InMemoryVectorStore(self._embeddings)
        self._store.add_documents(pieces)
        self._llm = self._chat_model()
        mode = f"upstream {os.environ['OPENAI_BASE_URL']}" if self._llm else "extractive"
        log.info(
            "rag indexed %d pieces of %d documents; answers: %s", len(pieces), len(documents), mode
        )

    def _chat_model(self) -> Any:
        base_url = os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            return None
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(
            base_url=base_url,
            api_key=os.environ.get("OPENAI_API_KEY", "not-needed"),
            model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
            streaming=True,
            max_retries=0,
        )

    def generate(self, request: GenerateInput) -> Iterator[str | Chunk]:
        ctx = current_context()
        question = next(
            (m["content"] for m in reversed(request.messages) if m["role"] == "user"), ""
        ).strip()
        if not question:
            yield Chunk("There is no question to answer.", finish_reason="stop")
            return
        hits = self._store.similarity_search_with_score(question, k=self.top_k)
        sources = [
            Source(source=doc.metadata["source"], text=doc.page_content, score=float(score))
            for doc, score in hits
        ]
        ctx.check()
        yield Chunk("", sources=sources)
        if self._llm is not None:
            yield from self._generate_upstream(request, sources)
        else:
            yield from self._extract(question, sources)

    def _extract(self, question: str, sources: list[Source]) -> Iterator[str | Chunk]:
        """The retrieved sentences closest to the question, best first."""
        import numpy as np

        ctx = current_context()
        candidates = [
            (" ".join(s.strip().lstrip("-*#> ").split()), src.source)
            for src in sources
            for s in _SENTENCE_END.split(src.text)
            if len(s.split()) >= 4
        ]
        if not candidates:
            nothing = "The indexed documents hold nothing close to this question."
            yield Chunk(nothing, finish_reason="stop")
            return
        vectors = np.asarray(self._minilm.embed([question] + [c[0] for c in candidates]).vectors)
        scores = vectors[1:] @ vectors[0]
        seen: set[str] = set()
        yield EXTRACTIVE_PREAMBLE
        quoted = 0
        for i in np.argsort(-scores):
            sentence, source = candidates[int(i)]
            if sentence in seen:
                continue
            seen.add(sentence)
            ctx.check()
            yield f"\n- {sentence} [{source}]"
            quoted += 1
            if quoted == self.quote:
                break
        yield Chunk("", finish_reason="stop")

    def _generate_upstream(
        self, request: GenerateInput, sources: list[Source]
    ) -> Iterator[str | Chunk]:
        from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

        ctx = current_context()
        context = "\n\n".join(f"[{s.source}]\n{s.text}" for s in sources)
        system = (
            "Answer the question using only the context below. Cite the sources you use "
            "in square brackets, as they are written. If the context does not hold the "
            f"answer, say so.\n\nContext:\n{context}"
        )
        turns = {"user": HumanMessage, "assistant": AIMessage}
        messages: list[Any] = [SystemMessage(system)]
        messages += [turns[m["role"]](m["content"]) for m in request.messages if m["role"] in turns]
        options: dict[str, Any] = {}
        if request.max_tokens:
            options["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            options["temperature"] = request.temperature
        remaining = ctx.time_remaining()
        if remaining is not None:
            options["timeout"] = max(remaining, 0.1)
        for piece in self._llm.stream(messages, **options):
            ctx.check()  # the caller left: stop reading (closes the upstream stream)
            if isinstance(piece.content, str) and piece.content:
                yield piece.content
        yield Chunk("", finish_reason="stop")
