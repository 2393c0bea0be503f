"""Partitioning time against one ingest of the same rows, across client counts; files written.

Run ``python -m benchmarks.bench_partition [--quick] [--rows N] [--out FILE]`` from the
repository root; prints one JSON object and writes it to ``--out`` (default
``benchmarks/results/partition.json``). The rows are ``--rows`` x 50 float64 features with 10
classes (200,000 by default), ingested in chunks of 4,096 rows. In one run, alternating, each
repeat times: ``ingest_arrays`` of the rows into a fresh store, then IID partitions of that
store into 10, 1,000 and 10,000 clients (in an order rotated each repeat), then 1,000 clients
again with the other partitions present. The best of the repeats is compared (the machine may be shared), as the issue's
targets: 10,000 clients <= 2x the ingest, 1,000 clients <= 1x the 10-client time, and the same
number of files whatever the number of clients.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

CONFIGS = (("c10", 10), ("c1000", 1_000), ("c10000", 10_000), ("c1000_after", 1_000))


def _files(root: str) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def run(workdir: str, n_rows: int, n_features: int, repeats: int) -> dict:
    """Seconds per configuration (every repeat), files per partition and the ratios."""
    from fedpipe.data.ingest import ingest_arrays
    from fedpipe.data.partition import partition

    rng = np.random.default_rng(0)
    X = rng.standard_normal((n_rows, n_features))
    y = rng.integers(0, 10, size=n_rows)
    path = os.path.join(workdir, "store.zarr")
    ingest_arrays(X[:1000], y[:1000], path, chunk_rows=256, overwrite=True, progress=False)
    partition(path, clients=10, name="warmup")  # imports and codec set-up out of the timings
    times: dict[str, list[float]] = {"ingest": [], **{name: [] for name, _ in CONFIGS}}
    files = {}
    for r in range(repeats):
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        ingest_arrays(X, y, path, chunk_rows=4096, overwrite=True, progress=False)
        times["ingest"].append(time.perf_counter() - start)
        files["ingest"] = _files(path)
        # The first writes after an ingest run slower (the ingest's pages still flushing):
        # rotate the order of 10, 1,000 and 10,000 clients; "after" runs with all three present.
        first = [CONFIGS[(i + r) % 3] for i in range(3)]
        for name, clients in first + [CONFIGS[3]]:
            start = time.perf_counter()
            partition(path, clients=clients, scheme="iid", seed=0, name=name)
            times[name].append(time.perf_counter() - start)
            files[name] = _files(os.path.join(path, "partitions", name))
    best = {k: min(v) for k, v in times.items()}
    return {
        "rows": n_rows, "features": n_features, "chunk_rows": 4096,
        "size_mb": round((X.nbytes + y.nbytes) / 1e6, 1),
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "best_seconds": {k: round(t, 2) for k, t in best.items()},
        "files_written": files,
        "ratios": {
            "c10000_over_ingest": round(best["c10000"] / best["ingest"], 3),
            "c1000_over_c10": round(best["c1000"] / best["c10"], 3),
            "c1000_after_c10000_over_c1000": round(best["c1000_after"] / best["c1000"], 3),
            "files_c10000_over_c10": round(files["c10000"] / files["c10"], 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows, one repeat")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/partition.json")
    args = parser.parse_args()
    rows, repeats = (20_000, 1) if args.quick else (args.rows, args.repeats)
    with tempfile.TemporaryDirectory() as workdir:
        result = {"benchmark": "partition", "quick": args.quick, "cpus": os.cpu_count(),
                  **run(workdir, rows, 50, repeats)}
    line = json.dumps(result)
    print(line)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
