"""Predict throughput from zarr against scikit-learn's ``predict`` in memory, in one run.

Run ``python -m benchmarks.bench_predict [--rows 2000000] [--features 50] [--out FILE]`` from
the repository root; prints one JSON object (and writes it to ``--out``). A standardised store
of ``rows x features`` synthetic rows (10 classes) is written once, a softmax model trained a
few L-BFGS iterations on it, then, alternating over ``--repeats``:

* ``fedpipe_store``: ``load_run(run).predict(STORE_URL).compute()``: read every chunk from
  zarr (decompress, checksum), standardise with the run's statistics, predict, map labels;
  Dask's threaded scheduler over the row chunks;
* ``fedpipe_stream``: ``fedpipe predict RUN STORE --out x.parquet``'s engine, one block at a
  time into a Parquet file;
* ``sklearn_memory``: ``run.to_sklearn().predict(X)`` (StandardScaler + LogisticRegression) on
  the same rows already in memory, so it pays no I/O at all.

The ratio (fedpipe rows/s over scikit-learn rows/s) is what to read: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def _data(rows: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, features))
    y = rng.integers(0, 10, size=rows)
    X = centres[y] + rng.normal(size=(rows, features))
    return X, y


def run(rows: int, features: int, repeats: int, workdir: str) -> dict:
    import dask
    import fedpipe as fp
    from fedpipe.cluster import connect
    from fedpipe.data.ingest import ingest_arrays
    from fedpipe.model import saved, stream
    from fedpipe.tasks import models
    from fedpipe.tasks.lbfgs import lbfgs

    X, y = _data(rows, features)
    url = os.path.join(workdir, "bench.zarr")
    info = ingest_arrays(X, y, url, standardize=True, overwrite=True)
    run_dir = os.path.join(workdir, "run")
    with connect(workers=1, threads=os.cpu_count() or 2, processes=False,
                 dashboard_address=":0") as dask_client:
        fp.fit(url, models.softmax(features, 10), lbfgs(), iterations=5, dask_client=dask_client,
               out=run_dir, test_fraction=0.0)
    loaded = fp.load_run(run_dir)
    pipe = loaded.to_sklearn()
    model = saved.load(run_dir)
    times: dict[str, list[float]] = {"fedpipe_store": [], "fedpipe_stream": [],
                                     "sklearn_memory": []}
    with dask.config.set(scheduler="threads"):
        for _ in range(repeats):
            start = time.perf_counter()
            ours = loaded.predict(url).compute()
            times["fedpipe_store"].append(time.perf_counter() - start)
            start = time.perf_counter()
            stream.predict_to_parquet(model, url, os.path.join(workdir, "p.parquet"),
                                      block_rows=info.chunk_rows)
            times["fedpipe_stream"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ref = pipe.predict(X)
            times["sklearn_memory"].append(time.perf_counter() - start)
    agree = float(np.mean(ours == ref))
    best = {k: min(v) for k, v in times.items()}
    rate = {k: rows / v for k, v in best.items()}
    return {"rows": rows, "features": features, "chunk_rows": info.chunk_rows,
            "repeats": repeats, "seconds_best": best, "rows_per_s": rate,
            "ratio_store_vs_sklearn": rate["fedpipe_store"] / rate["sklearn_memory"],
            "ratio_stream_vs_sklearn": rate["fedpipe_stream"] / rate["sklearn_memory"],
            "predictions_agree": agree, "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedpipe-bench-predict-") as workdir:
        result = run(args.rows, args.features, args.repeats, workdir)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
