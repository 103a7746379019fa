"""Drive a running gateway with the official ``openai`` package.

Chat (plain, streaming with usage, max_tokens), embeddings and an error, as a
product team's code would call them. Usage::

    python openai_sdk.py http://127.0.0.1:8080/v1

Prints ``ok`` and exits 0, or fails on the first mismatch.
"""

from __future__ import annotations

import sys

import openai
from openai import OpenAI


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="not-checked", max_retries=0, timeout=30)
    ask = [{"role": "user", "content": "one two three"}]

    chat = client.chat.completions.create(model="echo", messages=ask)
    assert chat.object == "chat.completion", chat
    assert chat.choices[0].message.role == "assistant", chat
    assert chat.choices[0].message.content == "one two three", chat
    assert chat.choices[0].finish_reason == "stop", chat
    assert chat.usage is not None and chat.usage.completion_tokens == 3, chat.usage

    short = client.chat.completions.create(model="echo", messages=ask, max_tokens=2)
    assert short.choices[0].message.content == "one two", short
    assert short.choices[0].finish_reason == "length", short

    stream = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "alpha beta gamma delta"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish = None
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert "".join(pieces) == "alpha beta gamma delta", pieces
    assert len(pieces) == 4, f"one chunk per word, got {pieces}"
    assert finish == "stop", finish
    assert usage is not None and usage.completion_tokens == 4, usage

    emb = client.embeddings.create(model="minilm", input=["hello world", "a gateway"])
    assert [d.index for d in emb.data] == [0, 1], emb.data
    assert all(len(d.embedding) == 384 for d in emb.data)
    norm = sum(x * x for x in emb.data[0].embedding) ** 0.5
    assert abs(norm - 1.0) < 1e-3, norm

    try:
        client.chat.completions.create(model="no-such-model", messages=ask)
    except openai.NotFoundError as exc:
        assert "no-such-model" in str(exc), exc
    else:
        raise AssertionError("an unknown model was answered")
    try:
        client.chat.completions.create(model="echo", messages=[])
    except openai.BadRequestError:
        pass
    else:
        raise AssertionError("empty messages were accepted")
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
