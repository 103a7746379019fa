"""Drive a running gateway's Responses API with the official ``openai``
package. Usage::

    python openai_responses.py http://127.0.0.1:8080/v1 KEY OTHER_KEY

``KEY`` and ``OTHER_KEY`` are API keys of two tenants. Plain and streaming
responses from ``echo`` (text, usage, the order of the events) and ``rag``;
``previous_response_id`` continuing a stored response; ``GET`` and
``DELETE``; the other tenant's key finds none of it.

Prints ``ok`` and exits 0, or fails on the first mismatch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import openai
from openai import OpenAI

#: The event types of a streamed response, in order (deltas collapsed).
ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def not_found(what: str, call: Callable[[], object]) -> None:
    """``call`` must be refused with 404; ``what`` says what went wrong if not."""
    try:
        call()
    except openai.NotFoundError:
        return
    raise AssertionError(what)


def main(base_url: str, key: str, other_key: str) -> None:
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
    other = OpenAI(base_url=base_url, api_key=other_key, max_retries=0, timeout=60)

    first = client.responses.create(model="echo", input="one two three", metadata={"case": "plain"})
    assert first.object == "response" and first.status == "completed", first
    assert first.output_text == "one two three", first.output_text
    assert first.usage is not None and first.usage.output_tokens == 3, first.usage
    assert first.usage.total_tokens == first.usage.input_tokens + 3, first.usage
    assert first.metadata == {"case": "plain"}, first.metadata

    short = client.responses.create(model="echo", input="a b c d", max_output_tokens=2)
    assert short.status == "incomplete" and short.output_text == "a b", short
    assert short.incomplete_details is not None
    assert short.incomplete_details.reason == "max_output_tokens", short

    # The stream: every event in order, numbered, the text in deltas.
    events = list(
        client.responses.create(
            model="echo",
            input=[
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "alpha beta gamma"}],
                }
            ],
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == ORDER, kinds
    assert [e.sequence_number for e in events] == list(range(len(events))), events
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "alpha beta gamma" and len(deltas) == 3, deltas
    done = events[-1].response
    assert done.status == "completed" and done.output_text == "alpha beta gamma", done
    assert done.usage is not None and done.usage.output_tokens == 3, done.usage

    # A continuation sees the conversation so far: echo repeats the last
    # user message, and the stored turns count as input tokens.
    follow = client.responses.create(model="echo", input="four five", previous_response_id=first.id)
    assert follow.previous_response_id == first.id and follow.output_text == "four five", follow
    assert follow.usage is not None and follow.usage.input_tokens > first.usage.input_tokens, (
        follow.usage,
        first.usage,
    )
    assert client.responses.retrieve(follow.id).output_text == "four five"

    # Another tenant finds none of it.
    not_found(
        "another tenant read a stored response",
        lambda: other.responses.retrieve(first.id),
    )
    not_found(
        "another tenant continued a stored response",
        lambda: other.responses.create(model="echo", input="x", previous_response_id=first.id),
    )
    not_found(
        "another tenant deleted a stored response",
        lambda: other.responses.delete(first.id),
    )

    unstored = client.responses.create(model="echo", input="gone", store=False)
    not_found("store=false was stored", lambda: client.responses.retrieve(unstored.id))
    client.responses.delete(first.id)
    not_found("a deleted response was found", lambda: client.responses.retrieve(first.id))

    rag = client.responses.create(
        model="rag",
        instructions="Answer from the documents.",
        input="What does the gateway speak to Python workers?",
    )
    # Its answer cites the passages it draws on.
    assert rag.status == "completed" and ".md:" in rag.output_text, rag.output_text
    streamed = "".join(
        e.delta
        for e in client.responses.create(model="rag", input="What is infergate?", stream=True)
        if e.type == "response.output_text.delta"
    )
    assert streamed.strip(), "rag streamed nothing"

    not_found(
        "an unknown model was answered",
        lambda: client.responses.create(model="no-such-model", input="x"),
    )
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
