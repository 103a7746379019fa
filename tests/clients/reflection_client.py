"""What tools that list and call gRPC services (grpcurl, Postman, Kreya) do to
the gateway's gRPC port, with grpcio's reflection client: list the services,
resolve each one's descriptor, and call every method of it with an empty
request. Usage::

    python reflection_client.py 127.0.0.1:50051 SERVICE [SERVICE ...]

The listed services must be exactly the SERVICEs given, and no method may
answer UNIMPLEMENTED (a listed method that does not exist misleads those
tools). Prints ``ok`` and exits 0, or fails on the first mismatch.
"""

from __future__ import annotations

import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def call(channel: grpc.Channel, path: str, client_streaming: bool, server_streaming: bool) -> str:
    """Call ``path`` with one empty message; the status it ends with (OK
    for a stream that answered at all)."""
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(client_streaming, server_streaming)]
    method = kind(path, request_serializer=None, response_deserializer=None)
    request = iter([b""]) if client_streaming else b""
    try:
        answer = method(request, timeout=10)
        if server_streaming:
            next(answer)  # one message is an answer; a stream may go on
            answer.cancel()
        return "OK"
    except StopIteration:
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def main(target: str, expected: list[str]) -> None:
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        listed = sorted(database.get_services())
        assert listed == sorted(expected), (listed, sorted(expected))
        pool = DescriptorPool(database)
        answers = {}
        for name in listed:
            service = pool.FindServiceByName(name)
            assert service.methods, name
            for m in service.methods:
                path = f"/{name}/{m.name}"
                answers[path] = call(channel, path, m.client_streaming, m.server_streaming)
        unimplemented = [path for path, code in answers.items() if code == "UNIMPLEMENTED"]
        assert not unimplemented, answers
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
