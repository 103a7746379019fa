#!/usr/bin/env python3
"""CPU profiles of the gateway and its Python worker under a scenario's load.

    make profile SCENARIO=tiny RATE=4000 TAG=before

Starts the scenario's gateway (servers pinned as in benches/scenarios.py),
offers `RATE` requests/s from the load cores, and meanwhile records the
gateway with `perf record -g` and its first worker with `py-spy record`.
Writes to benches/results/profiles/:

- ``<scenario>-<tag>-gateway.svg`` and ``-worker.svg``: flamegraphs
  (inferno);
- ``<scenario>-<tag>.md``: the load step's figures and, for each process,
  the ten leaf functions with the most samples (self time) and the share of
  samples per library or crate.

perf needs root (or a permissive ``kernel.perf_event_paranoid``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import scenarios as sc

TOOLS = sc.ROOT / ".tools/bin"
OUT = sc.RESULTS / "profiles"

REJECT_KEY = "ig_bench-reject-key-0123456789abcdefghijklmnopq"
REJECT_DIGEST = hashlib.sha256(REJECT_KEY.encode()).hexdigest()

# What each scenario runs: the pool, the request and its route.
SETUPS: dict[str, dict[str, Any]] = {
    "tiny": {
        "pool": '[[pools]]\nname = "echo"\nclass = "infergate_worker.examples.echo:Echo"\n',
        "args": ["--body-file", str(sc.ECHO_BODY)],
        "route": "/v2/models/echo/infer",
    },
    "minilm": {
        "pool": sc.minilm_pool(len(sc.SERVER_CPUS.split(","))),
        "args": ["--texts", "unique", "--inputs", "1", "--model", "minilm"],
        "route": "/v1/embeddings",
    },
    # A key whose limit is spent: every request after the first is a 429.
    "reject": {
        "pool": '[[pools]]\nname = "echo"\nclass = "infergate_worker.examples.echo:Echo"\n'
        f'[auth]\nenabled = true\n[[auth.keys]]\nid = "bench"\nsha256 = "{REJECT_DIGEST}"\n'
        'tenant = "bench"\n[limits]\nper_key = { rate = 0.0001, burst = 1 }\n',
        "args": [
            *("--body-file", str(sc.ECHO_BODY), "--expect-status", "429"),
            *("--header", f"Authorization: Bearer {REJECT_KEY}"),
        ],
        "route": "/v2/models/echo/infer",
    },
}


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def folded_top(
    folded: Path, n: int = 12
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The `n` leaf frames with the most samples (self time), and samples by
    owner (see `owner`), as shares of all samples."""
    leaves: collections.Counter[str] = collections.Counter()
    owners: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        leaves[frames[-1]] += int(count)
        owners[owner(frames)] += int(count)
        total += int(count)

    def share(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in c.most_common(n)]

    return share(leaves), share(owners)


STD = ("core", "alloc", "std")


def owner(frames: list[str]) -> str:
    """Who a stack's time belongs to: the deepest frame of a crate (its first
    two path segments, `hyper::proto`) or Python file, skipping the standard
    library; kernel time is named after the code that entered the kernel."""
    kernel = False
    for frame in reversed(frames):
        frame = frame.strip()
        if frame.endswith("_[k]"):  # inferno-collapse-perf --all marks kernel frames
            kernel = True
            continue
        if "(" in frame and frame.endswith(")"):  # py-spy: "function (file.py:line)"
            return frame[frame.rfind("(") + 1 : -1].split(":")[0].rsplit("/", 1)[-1]
        m = re.match(r"^<?([a-z_0-9]+)::([A-Za-z_0-9]+)", frame)
        if m and m.group(1) not in STD:
            name = f"{m.group(1)}::{m.group(2)}"
            return f"kernel, under {name}" if kernel else name
    return "kernel" if kernel else "native (libc, ...)"


def table(rows: list[tuple[str, float]]) -> str:
    return "| share | frame |\n|---:|---|\n" + "".join(
        f"| {v:.1%} | `{k[:160].replace('|', '/')}` |\n" for k, v in rows
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=sorted(SETUPS))
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--tag", default="now")
    ap.add_argument("--keep", type=Path, help="also copy the folded stacks here")
    ap.add_argument(
        "--pool-extra",
        default="",
        help='lines added to the pool\'s table, e.g. batching = { max_delay = "2ms" }',
    )
    a = ap.parse_args()
    setup = SETUPS[a.scenario]
    pool = setup["pool"] + (a.pool_extra + "\n" if a.pool_extra else "")
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"{a.scenario}-{a.tag}"
    with tempfile.TemporaryDirectory(prefix="infergate-profile-") as d:
        tmp = Path(d)
        with sc.gateway(pool, tmp) as gw:
            gw_pid = int(gw["pid"])
            workers = children(gw_pid)
            report: dict[str, Any] = {}
            step = [*setup["args"], "--url", gw["http"] + setup["route"], "--rate", str(a.rate)]

            def offer() -> None:
                report.update(sc.load(step, "profiled", tmp, duration=f"{a.seconds + 4}s"))

            loader = threading.Thread(target=offer)
            loader.start()
            time.sleep(2)
            perf_data = tmp / "perf.data"
            perf = subprocess.Popen(
                [
                    "perf",
                    "record",
                    "-F",
                    "299",
                    "--call-graph",
                    "dwarf,32768",
                    "-o",
                    str(perf_data),
                    "-p",
                    str(gw_pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            spy = None
            if workers:
                spy_cmd = [str(sc.ROOT / ".venv/bin/py-spy"), "record", "-p", str(workers[0])]
                spy_cmd += [
                    "-d",
                    str(a.seconds),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "-o",
                    str(tmp / "w.txt"),
                ]
                spy = subprocess.Popen(
                    spy_cmd,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            time.sleep(a.seconds)
            perf.send_signal(2)
            perf.wait()
            if spy:
                spy.wait()
            loader.join()
        gw_folded = tmp / "gw.folded"
        script = subprocess.run(
            ["perf", "script", "-i", str(perf_data)], capture_output=True, check=True
        )
        collapsed = subprocess.run(
            [str(TOOLS / "inferno-collapse-perf"), "--all"],
            input=script.stdout,
            capture_output=True,
        )
        gw_folded.write_bytes(collapsed.stdout)
        parts = [(f"gateway (perf, pid {gw_pid})", gw_folded, OUT / f"{name}-gateway.svg")]
        if spy and (tmp / "w.txt").exists():
            parts.append(
                (f"worker (py-spy, pid {workers[0]})", tmp / "w.txt", OUT / f"{name}-worker.svg")
            )
        md = [f"# Profile: {a.scenario} at {a.rate:.0f} rps ({a.tag})\n"]
        m = sc.machine()
        md.append(
            f"Machine: {m['cpus']} cores ({m['cpu_model']}), servers on cpus {m['server_cpus']}, "
            f"load on cpus {m['load_cpus']}; {m['date']}. Command: `make profile "
            f"SCENARIO={a.scenario} RATE={a.rate:.0f} TAG={a.tag}` ({a.seconds} s recorded).\n"
        )
        r = report.get("reports", [{}])[0]
        if r:
            md.append(
                f"Load step: {r['achieved_rps']:.0f} rps achieved of {r['offered_rps']:.0f}, "
                f"p50 {r['latency_ms']['p50']:.2f} ms, p99 {r['latency_ms']['p99']:.2f} ms, "
                f"outcomes {r['outcomes']}.\n"
            )
        for title, folded, svg in parts:
            if a.keep:
                a.keep.mkdir(parents=True, exist_ok=True)
                (a.keep / f"{svg.stem}.folded").write_bytes(folded.read_bytes())
            with svg.open("wb") as out:
                subprocess.run(
                    [
                        str(TOOLS / "inferno-flamegraph"),
                        "--minwidth",
                        "1",
                        "--title",
                        f"{name} {title}",
                    ],
                    stdin=folded.open("rb"),
                    stdout=out,
                    check=True,
                )
            leaves, owners = folded_top(folded)
            md.append(f"## {title}\n\nFlamegraph: `{svg.name}`.\n\nSelf time by leaf frame:\n")
            md.append(table(leaves))
            md.append(
                "\nBy owner: the deepest frame of a crate (`crate::module`) or Python "
                "file on each stack; kernel time is named after the code that entered it:\n"
            )
            md.append(table(owners))
        (OUT / f"{name}.md").write_text("\n".join(md))
        print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
