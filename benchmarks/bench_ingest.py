"""Ingest throughput against zarr's own write, and peak RSS of a streamed CSV ingest.

Run ``python -m benchmarks.bench_ingest [--quick]`` from the repository root; prints one JSON
object. Part 1 writes the same in-memory synthetic array (>= 1 GB by default) with
``fedpipe.data.ingest.ingest_arrays`` (validation, checksums, content hash, statistics tree) and
with a bare ``zarr`` write using the same chunks and codecs, alternating, in one run; the
ratio is what to read, since the machine may be shared. Part 2 writes a CSV (>= 2 GB by
default) to a temporary directory and ingests it in a child process that reports its own
peak RSS, next to the peak RSS of a child that only imports fedpipe.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

GB = 1e9


def _raw_zarr_write(X: np.ndarray, y: np.ndarray, path: str, rows: int) -> None:
    import zarr
    from fedpipe.data.store import codecs

    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array("X", data=X, chunks=(rows, X.shape[1]), compressors=codecs())
    group.create_array("y", data=y, chunks=(rows,), compressors=codecs())


def _ingest_write(X: np.ndarray, y: np.ndarray, path: str, rows: int) -> None:
    from fedpipe.data.ingest import ingest_arrays

    ingest_arrays(X, y, path, chunk_rows=rows, overwrite=True, progress=False)


def throughput(workdir: str, n_rows: int, n_features: int, repeats: int) -> dict:
    """MB/s of fedpipe's ingest and of a raw zarr write of the same array, alternating."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n_rows, n_features))
    y = rng.integers(0, 10, size=n_rows)
    rows = max(1, (8 << 20) // (8 * n_features))
    size_mb = (X.nbytes + y.nbytes) / 1e6
    times = {"zarr_raw": [], "fedpipe_ingest": []}
    # Warm up imports and codec set-up so neither side pays them in the timed runs.
    for write in (_raw_zarr_write, _ingest_write):
        write(X[:1000], y[:1000], os.path.join(workdir, "warmup.zarr"), rows)
        shutil.rmtree(os.path.join(workdir, "warmup.zarr"))
    for _ in range(repeats):
        for name, write in (("zarr_raw", _raw_zarr_write), ("fedpipe_ingest", _ingest_write)):
            path = os.path.join(workdir, f"{name}.zarr")
            shutil.rmtree(path, ignore_errors=True)
            start = time.perf_counter()
            write(X, y, path, rows)
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    return {
        "rows": n_rows, "features": n_features, "chunk_rows": rows, "size_mb": round(size_mb, 1),
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "mb_per_s": {k: round(size_mb / t, 1) for k, t in best.items()},
        "ingest_over_raw_speed": round(best["zarr_raw"] / best["fedpipe_ingest"], 3),
    }


def _write_csv(path: str, n_rows: int, n_features: int) -> int:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(1)
    names = [f"f{j}" for j in range(n_features)] + ["target"]
    batch = 500_000
    with pacsv.CSVWriter(path, pa.schema([(n, pa.float64()) for n in names[:-1]]
                                         + [("target", pa.int64())])) as writer:
        for start in range(0, n_rows, batch):
            m = min(batch, n_rows - start)
            cols = [pa.array(rng.standard_normal(m)) for _ in range(n_features)]
            cols.append(pa.array(rng.integers(0, 5, size=m)))
            writer.write_table(pa.table(cols, names=names))
    return os.path.getsize(path)


# Linux carries ru_maxrss across fork+exec (the child would report the parent's size), so
# the child reads its own high-water mark, VmHWM, where /proc has it.
CHILD = """
import json, resource, sys, time
from fedpipe.data.ingest import ingest
start = time.perf_counter()
if sys.argv[1] != "--import-only":
    ingest(sys.argv[1], sys.argv[2], chunk_rows=int(sys.argv[3]), progress=False)
seconds = time.perf_counter() - start
try:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    peak_mb = int(hwm.split()[1]) / 1024
except OSError:
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"maxrss_mb": peak_mb, "seconds": seconds}))
"""


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def csv_rss(workdir: str, n_rows: int, n_features: int) -> dict:
    """Peak RSS of ingesting a CSV in a child process, against the RSS of the imports alone."""
    path = os.path.join(workdir, "big.csv")
    start = time.perf_counter()
    csv_bytes = _write_csv(path, n_rows, n_features)
    generated = time.perf_counter() - start
    baseline = _child("--import-only")
    run = _child(path, os.path.join(workdir, "csv.zarr"), "65536")
    return {
        "csv_gb": round(csv_bytes / GB, 2), "rows": n_rows, "features": n_features,
        "csv_write_seconds": round(generated, 1),
        "ingest_seconds": round(run["seconds"], 1),
        "ingest_mb_per_s_of_csv": round(csv_bytes / 1e6 / run["seconds"], 1),
        "peak_rss_mb": round(run["maxrss_mb"], 1),
        "import_only_rss_mb": round(baseline["maxrss_mb"], 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if args.quick:
        sizes = {"rows": 50_000, "features": 32, "repeats": 1, "csv_rows": 100_000, "csv_features": 8}
    else:  # 1.1M x 128 float64 = 1.13 GB; 10M x 20 CSV columns = about 2.3 GB of text
        sizes = {"rows": 1_100_000, "features": 128, "repeats": 3, "csv_rows": 10_000_000,
                 "csv_features": 20}
    workdir = tempfile.mkdtemp(prefix="fedpipe-bench-")
    try:
        result = {
            "benchmark": "ingest", "quick": args.quick, "cpus": os.cpu_count(),
            "throughput": throughput(workdir, sizes["rows"], sizes["features"], sizes["repeats"]),
        }
        shutil.rmtree(os.path.join(workdir, "zarr_raw.zarr"), ignore_errors=True)
        shutil.rmtree(os.path.join(workdir, "fedpipe_ingest.zarr"), ignore_errors=True)
        result["csv_stream"] = csv_rss(workdir, sizes["csv_rows"], sizes["csv_features"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    return result


if __name__ == "__main__":
    main()
