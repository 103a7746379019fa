"""The raw batched model loop: the physical limit of a model on these cores.

No server, no network, no serialisation: one Python process loads the same
model class the workers and the FastAPI baseline serve and calls ``embed``
on consecutive batches of texts as fast as it can. For each batch size it
reports texts per second and the time one batch takes; the best batch size
is what a perfect batching server could approach on the same cores.

    python raw_loop.py --texts texts.txt --batch-sizes 1,8,32 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from app import load_models

from infergate_worker import Model

DEFAULT_MODEL = "infergate_worker.examples.minilm:MiniLM"


def measure(model: Model, texts: list[str], batch: int, seconds: float) -> dict[str, float]:
    """Embed `batch`-sized slices of `texts` (wrapping around) for `seconds`."""
    model.embed(texts[:batch])  # warm-up: allocator, kernels, tokenizer caches
    done, start, calls = 0, time.perf_counter(), []
    i = 0
    while time.perf_counter() - start < seconds:
        chunk = texts[i : i + batch]
        if len(chunk) < batch:
            i, chunk = 0, texts[:batch]
        t = time.perf_counter()
        out = model.embed(chunk)
        calls.append(time.perf_counter() - t)
        vectors = getattr(out, "vectors", out)
        if len(vectors) != len(chunk):
            raise RuntimeError(f"{len(chunk)} texts gave {len(vectors)} vectors")
        done += len(chunk)
        i += batch
    elapsed = time.perf_counter() - start
    return {
        "batch_size": batch,
        "texts": done,
        "seconds": elapsed,
        "texts_per_s": done / elapsed,
        "batch_ms_p50": statistics.median(calls) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="module:Class")
    parser.add_argument("--texts", type=Path, required=True, help="one text per line")
    parser.add_argument("--batch-sizes", default="1,4,8,16,32,64")
    parser.add_argument("--seconds", type=float, default=5.0, help="per batch size")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()

    texts = args.texts.read_text().splitlines()
    (model,) = load_models(args.model).values()
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        if batch > len(texts):
            parser.error(f"batch size {batch} exceeds the {len(texts)} texts given")
        r = measure(model, texts, batch, args.seconds)
        results.append(r)
        print(
            f"batch {batch:>3}: {r['texts_per_s']:8.1f} texts/s, {r['batch_ms_p50']:.2f} ms/batch",
            file=sys.stderr,
        )
    best = max(results, key=lambda r: r["texts_per_s"])
    doc = {"model": args.model, "results": results, "best": best}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    else:
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
