"""Model-parallel against data-parallel training, side by side on one cluster (issue 20).

Run ``python -m benchmarks.bench_model_parallel [--quick] [--out FILE]`` from the repository
root; prints one JSON object. Two worker processes (one thread each), full-batch Adam, the same
store for both engines, runs alternated (``--repeats`` each) and medians taken:

* ``moderate``: a softmax model that fits one process (``--rows`` x 50 features, 4 classes,
  X chunked in 2 feature blocks): median seconds per iteration of each engine and their ratio
  (issue target <= 1.5), and the largest parameter difference relative to the largest
  parameter (target 1e-10);
* ``wide``: few rows, many features, 10 classes (``--wide-rows`` x ``--wide-features``): bytes
  moved per iteration by each engine and their ratio. Measured: worker-to-worker transfers
  (``Worker.transfer_outgoing_bytes_total``, summed over the workers, per iteration). Counted
  from the message sizes: what the driver sends and gathers (data-parallel: the parameters out
  to each worker, one gradient back; model-parallel: the intercept out, one row of sums back).

The machine may be shared with other jobs: compare the ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_store(path: str, rows: int, features: int, classes: int, chunk_rows: int,
               feature_chunks: int, seed: int = 0) -> str:
    from fedpipe.data.ingest import ingest_arrays

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, features))
    W = rng.standard_normal((features, classes)) / np.sqrt(features) * 3
    y = np.argmax(X @ W + rng.gumbel(size=(rows, classes)), axis=1)
    ingest_arrays(X, y, path, chunk_rows=chunk_rows, feature_chunks=feature_chunks,
                  task="multiclass", overwrite=True)
    return path


def _outgoing(dc) -> int:
    return sum(dc.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())


def run(dc, store: str, model, iterations: int, sharded: bool) -> dict:
    import fedpipe as fp

    before = _outgoing(dc)
    result = fp.fit(store, model, fp.optimizers.adam(0.05), iterations=iterations,
                    dask_client=dc, shard_parameters=sharded, test_fraction=0.0,
                    **({"shards": 2} if sharded else {}))
    moved = (_outgoing(dc) - before) / (iterations + 1)  # passes: iterations + 1
    return {"seconds": result.summary["seconds_per_iteration"], "params": result.params,
            "worker_bytes": moved}


def driver_bytes(model, n_out: int, n_workers: int, sharded: bool) -> int:
    if sharded:  # the intercept out to each row block's head task, one row of sums back
        return 8 * n_out * n_workers + 8 * (2 + n_out + 6)
    return 8 * model.n_params * (n_workers + 1)  # parameters to each worker, a gradient back


def side_by_side(dc, store: str, model, iterations: int, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {"data_parallel": [], "model_parallel": []}
    for _ in range(repeats):  # alternate, so both see the same load
        runs["data_parallel"].append(run(dc, store, model, iterations, False))
        runs["model_parallel"].append(run(dc, store, model, iterations, True))
    dp, mp = runs["data_parallel"], runs["model_parallel"]
    sec = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    ref = dp[0]["params"]
    gap = max(float(np.max(np.abs(r["params"] - ref))) for r in mp) / float(np.max(np.abs(ref)))
    return {"seconds_per_iteration": sec,
            "ratio_model_over_data": sec["model_parallel"] / sec["data_parallel"],
            "params_max_rel_diff": gap,
            "worker_bytes_per_iteration": {
                k: statistics.median(r["worker_bytes"] for r in v) for k, v in runs.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--wide-rows", type=int, default=1_000)
    parser.add_argument("--wide-features", type=int, default=16_384)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.wide_rows, args.wide_features = 20_000, 200, 2_048
        args.iterations, args.repeats = 5, 1

    import dask
    import fedpipe as fp
    from distributed import Client, LocalCluster

    dask.config.set({"distributed.worker.profile.enabled": False})
    out: dict = {"machine": "shared 2-core machine (other jobs running): compare ratios",
                 "workers": 2, "threads_per_worker": 1, "optimizer": "adam(0.05)",
                 "iterations": args.iterations, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as dc:
        moderate = make_store(str(Path(tmp) / "moderate.zarr"), args.rows, 50, 4,
                              max(args.rows // 8, 1), 2)
        start = time.perf_counter()
        out["moderate"] = {"rows": args.rows, "features": 50, "classes": 4, "chunks": 8,
                           **side_by_side(dc, moderate, fp.models.softmax(50, 4),
                                          args.iterations, args.repeats)}
        wide = make_store(str(Path(tmp) / "wide.zarr"), args.wide_rows, args.wide_features, 10,
                          max(args.wide_rows // 4, 1), 2)
        model = fp.models.softmax(args.wide_features, 10)
        result = side_by_side(dc, wide, model, args.iterations, args.repeats)
        driver = {k: driver_bytes(model, 10, 2, k == "model_parallel")
                  for k in ("data_parallel", "model_parallel")}
        total = {k: result["worker_bytes_per_iteration"][k] + driver[k] for k in driver}
        out["wide"] = {"rows": args.wide_rows, "features": args.wide_features, "classes": 10,
                       "parameter_bytes": model.n_params * 8,
                       "activation_bytes": 8 * args.wide_rows * 10, **result,
                       "driver_bytes_per_iteration": driver,
                       "bytes_per_iteration": total,
                       "bytes_ratio_data_over_model": total["data_parallel"] /
                       max(total["model_parallel"], 1)}
        out["seconds"] = time.perf_counter() - start
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
