"""A DNS server whose records the test controls: answers A and AAAA queries
from a JSON file (``{"name.": ["127.0.0.2", "::1"]}``), read again on every
query, so a test adds and removes workers by rewriting the file. Unknown
names get NXDOMAIN. UDP and TCP on one port, which it picks and prints
(``dns on 127.0.0.1:PORT``).

    python dns_server.py ZONE.json
"""

from __future__ import annotations

import errno
import ipaddress
import json
import sys
import time
from pathlib import Path

from dnslib import AAAA, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSServer


class ZoneFile(BaseResolver):
    def __init__(self, path: Path) -> None:
        self.path = path

    def resolve(self, request, handler):  # noqa: ANN001, ANN201 (dnslib's interface)
        reply = request.reply()
        name = str(request.q.qname).lower()
        try:
            zone = json.loads(self.path.read_text())
        except (OSError, ValueError):
            zone = {}
        if name not in zone:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for addr in zone[name]:
            ip = ipaddress.ip_address(addr)
            if ip.version == 4 and request.q.qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(addr), ttl=0))
            if ip.version == 6 and request.q.qtype in (QTYPE.AAAA, QTYPE.ANY):
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(addr), ttl=0))
        return reply


def main() -> None:
    zone = Path(sys.argv[1])
    servers = serve(ZoneFile(zone))
    for s in servers:
        s.start_thread()
    port = servers[0].server.server_address[1]
    print(f"dns on 127.0.0.1:{port}", flush=True)
    while all(s.isAlive() for s in servers):
        time.sleep(0.5)


def serve(resolver: BaseResolver) -> list[DNSServer]:
    """UDP and TCP servers on one free port: the system picks a free UDP
    port, which may be taken for TCP (by any connection's local end); then
    try another."""
    for _ in range(100):
        udp = DNSServer(resolver, address="127.0.0.1", port=0, logger=_Quiet())
        port = udp.server.server_address[1]
        try:
            tcp = DNSServer(resolver, address="127.0.0.1", port=port, tcp=True, logger=_Quiet())
        except OSError as exc:
            udp.server.server_close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return [udp, tcp]
    raise SystemExit("no port free for both UDP and TCP")


class _Quiet:
    """dnslib logs every query by default."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


if __name__ == "__main__":
    main()
