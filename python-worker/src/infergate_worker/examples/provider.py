"""``provider``: chat forwarded to a hosted or self-hosted LLM provider.

One worker class for any provider LangChain speaks to, configured by the
pool's ``env``, so that several providers are several pools and
multi-provider fallback is routing between them (an alias whose variants, or
fallbacks, are the provider pools)::

    [[pools]]
    name = "vllm"
    class = "infergate_worker.examples.provider:Provider"
    [pools.env]
    INFERGATE_PROVIDER = "openai"
    OPENAI_BASE_URL = "http://vllm:8000/v1"
    OPENAI_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
    INFERGATE_PROVIDER_MAX_CONCURRENCY = "16"

Environment:

- ``INFERGATE_PROVIDER``: ``openai`` (default; any OpenAI-compatible server:
  OpenAI, vLLM, Ollama, ...; ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``,
  ``OPENAI_MODEL``), ``anthropic`` (``pip install langchain-anthropic``;
  ``ANTHROPIC_API_KEY``, ``ANTHROPIC_MODEL``) or ``gemini``
  (``pip install langchain-google-genai``; ``GOOGLE_API_KEY``, ``GEMINI_MODEL``).
- ``INFERGATE_PROVIDER_MODEL``: the model name clients use (default ``provider``).
- ``INFERGATE_PROVIDER_MAX_CONCURRENCY``: calls this worker sends upstream at
  once (the bulkhead; default 8). A call that finds it full waits at most
  ``INFERGATE_PROVIDER_MAX_WAIT`` seconds (default 0) and is then refused as
  shed (RESOURCE_EXHAUSTED): the gateway retries it elsewhere or falls back.

Upstream failures before the first token become UNAVAILABLE (so the route's
fallback answers); after it, the stream ends with the error.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from infergate_worker import (
    Cancelled,
    Chunk,
    GenerateInput,
    Model,
    Overloaded,
    Unavailable,
    current_context,
)

log = logging.getLogger(__name__)


def chat_model(provider: str) -> Any:
    """The LangChain chat model for ``provider``, configured from the environment."""
    if provider == "openai":
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(
            base_url=os.environ.get("OPENAI_BASE_URL") or None,
            api_key=os.environ.get("OPENAI_API_KEY", "not-needed"),
            model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
            streaming=True,
            stream_usage=True,
            max_retries=0,
        )
    if provider == "anthropic":
        try:
            from langchain_anthropic import ChatAnthropic
        except ImportError as exc:
            raise RuntimeError("INFERGATE_PROVIDER=anthropic needs langchain-anthropic") from exc
        return ChatAnthropic(
            model=os.environ.get("ANTHROPIC_MODEL", "claude-3-5-haiku-latest"), max_retries=0
        )
    if provider == "gemini":
        try:
            from langchain_google_genai import ChatGoogleGenerativeAI
        except ImportError as exc:
            raise RuntimeError("INFERGATE_PROVIDER=gemini needs langchain-google-genai") from exc
        return ChatGoogleGenerativeAI(model=os.environ.get("GEMINI_MODEL", "gemini-2.0-flash"))
    raise RuntimeError(f"INFERGATE_PROVIDER must be openai, anthropic or gemini, not {provider!r}")


class Provider(Model):
    name = os.environ.get("INFERGATE_PROVIDER_MODEL", "provider")
    kind = "generate"
    version = os.environ.get("INFERGATE_PROVIDER", "openai")
    max_batch_size = 1
    platform = "langchain"

    def load(self) -> None:
        self.provider = os.environ.get("INFERGATE_PROVIDER", "openai")
        self.max_concurrency = int(os.environ.get("INFERGATE_PROVIDER_MAX_CONCURRENCY", "8"))
        self.max_wait = float(os.environ.get("INFERGATE_PROVIDER_MAX_WAIT", "0"))
        if self.max_concurrency < 1:
            raise RuntimeError("INFERGATE_PROVIDER_MAX_CONCURRENCY must be at least 1")
        self._bulkhead = threading.BoundedSemaphore(self.max_concurrency)
        self._llm = chat_model(self.provider)
        log.info(
            "provider %s ready: model %r, at most %d calls upstream at once",
            self.provider,
            self.name,
            self.max_concurrency,
        )

    def generate(self, request: GenerateInput) -> Iterator[str | Chunk]:
        ctx = current_context()
        wait = self.max_wait
        remaining = ctx.time_remaining()
        if remaining is not None:
            wait = max(0.0, min(wait, remaining))
        if not self._bulkhead.acquire(timeout=wait):
            raise Overloaded(
                f"{self.provider}: {self.max_concurrency} calls already upstream (bulkhead full)"
            )
        try:
            yield from self._stream(request)
        finally:
            self._bulkhead.release()

    def _stream(self, request: GenerateInput) -> Iterator[str | Chunk]:
        from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

        ctx = current_context()
        roles = {"system": SystemMessage, "developer": SystemMessage, "assistant": AIMessage}
        messages = [roles.get(m["role"], HumanMessage)(m["content"]) for m in request.messages]
        options: dict[str, Any] = {}
        if request.max_tokens:
            options["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.stop:
            options["stop"] = request.stop
        usage: dict[str, int] = {}
        finish = "stop"
        started = False
        try:
            for piece in self._llm.stream(messages, **options):
                ctx.check()  # the caller left: stop reading, which closes the upstream stream
                if getattr(piece, "usage_metadata", None):
                    usage = dict(piece.usage_metadata)
                if piece.response_metadata.get("finish_reason") == "length":
                    finish = "length"
                if isinstance(piece.content, str) and piece.content:
                    started = True
                    yield piece.content
        except Cancelled:
            raise
        except Exception as exc:
            if started:
                raise
            raise Unavailable(f"{self.provider}: {type(exc).__name__}: {exc}") from exc
        yield Chunk(
            "",
            prompt_tokens=usage.get("input_tokens"),
            completion_tokens=usage.get("output_tokens"),
            finish_reason=finish,
        )
