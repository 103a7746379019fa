"""The echo model under another name, for a pool of its own: the hostile
bench's large tensors sent there leave the ordinary client's worker alone,
so what the client still loses is the gateway's (and the shared core's)."""

from infergate_worker.examples.echo import Echo


class EchoOther(Echo):
    name = "echo-other"
