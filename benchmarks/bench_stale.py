"""Bounded-staleness training (``--mode async``) with one slow worker, against synchronous.

Run ``python -m benchmarks.bench_stale [--quick] [--repeats N] [--out FILE]`` from the
repository root; prints one JSON object (``benchmarks/results/stale.json``).

An MLP (one hidden layer of 64) on a synthetic 4-class problem (48,000 x 40 rows in 16 chunks,
one gradient task per chunk) trains for a fixed number of full-batch Adam steps on a 4-worker
in-process cluster (one thread and one BLAS thread each; work stealing off, so that a worker's
blocks stay with it). One worker is slowed 3x by a real sleep in its tasks: each of its
``loss_and_grad`` calls sleeps twice the time the call computed. Each repeat runs, in a rotated
order, synchronous ``fit`` and ``fit(mode=BoundedStaleness(S))`` for S = 0, 2, 4 (real arrival
order, one group of blocks per worker) and records seconds per step (the median of the records'
``seconds``), the exact training loss after the same number of applied updates (the final
synchronous pass) and the test accuracy. The ratios to synchronous come from the same repeat;
the report gives their medians. ``S<k>-same-time`` then runs each bound for as many updates as
fit in that repeat's synchronous run time (the loss a user gets for the same wait). The machine
may be shared: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

N_ROWS, N_FEATURES, N_CLASSES, CHUNK_ROWS = 48_000, 40, 4, 3_000
BOUNDS = (0, 2, 4)
SLOWDOWN = 3.0


class SlowOn:
    """``loss_and_grad`` that sleeps ``(factor - 1)`` times its own compute time on one worker."""

    def __init__(self, address: str, loss_and_grad: Any, factor: float = SLOWDOWN):
        self.address, self.loss_and_grad, self.factor = address, loss_and_grad, factor

    def __call__(self, params, X, y):
        from distributed import get_worker

        start = time.perf_counter()
        out = self.loss_and_grad(params, X, y)
        if get_worker().address == self.address:
            time.sleep((self.factor - 1.0) * (time.perf_counter() - start))
        return out


def run(quick: bool = False, repeats: int = 3) -> dict[str, Any]:
    import dask
    import fedpipe as fp
    from distributed import Client, LocalCluster
    from fedpipe.data.ingest import ingest
    from threadpoolctl import threadpool_limits

    iterations = 12 if quick else 30
    n_rows = N_ROWS // 2 if quick else N_ROWS
    threadpool_limits(limits=1)
    dask.config.set({"distributed.worker.profile.enabled": False,
                     "distributed.scheduler.work-stealing": False})
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(n_workers=4, threads_per_worker=1, processes=False,
                         dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as dc:
        store = f"{tmp}/bench.zarr"
        ingest(f"synthetic:classification?n_samples={n_rows}&n_features={N_FEATURES}"
               f"&n_classes={N_CLASSES}&n_informative=20&seed=0", store,
               chunk_rows=CHUNK_ROWS // (2 if quick else 1), progress=False, standardize=True)
        slow = sorted(dc.scheduler_info()["workers"])[-1]
        base = fp.models.mlp(N_FEATURES, N_CLASSES, hidden=(64,))
        model = base._replace(loss_and_grad=SlowOn(slow, base.loss_and_grad))
        runs: dict[str, list[dict[str, Any]]] = {
            name: [] for name in [*_names(), *(f"S{s}-same-time" for s in BOUNDS[1:])]}
        for r in range(repeats):
            names = _names()
            names = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            for name in names:
                mode = None if name == "sync" else fp.BoundedStaleness(int(name[1:]))
                result = fp.fit(store, model, fp.optimizers.adam(0.01), iterations=iterations,
                                dask_client=dc, chunks_per_task=1, cache="memory", mode=mode,
                                seed=0)
                runs[name].append(_measure(result, n_groups=4))
            for bound in BOUNDS[1:]:  # as many updates as fit in the synchronous run's time
                name = f"S{bound}"
                steps = round(iterations * runs["sync"][-1]["total_seconds"]
                              / runs[name][-1]["total_seconds"])
                result = fp.fit(store, model, fp.optimizers.adam(0.01), iterations=steps,
                                dask_client=dc, chunks_per_task=1, cache="memory", seed=0,
                                mode=fp.BoundedStaleness(bound))
                runs[f"{name}-same-time"].append({**_measure(result, n_groups=4),
                                                  "iterations": steps})
    return _report(runs, iterations, quick, repeats)


def _names() -> list[str]:
    return ["sync", *(f"S{s}" for s in BOUNDS)]


def _measure(result, n_groups: int) -> dict[str, Any]:
    steps = result.metrics[1:-1]  # record 0 also times the start; the last is the final pass
    seconds = [r["seconds"] for r in steps]
    # passes over the data the gradient tasks made: a group's arrival is 1/n_groups of one
    passes = (sum(len(r["arrivals"]) for r in steps) / n_groups if "arrivals" in steps[0]
              else len(steps))
    final = result.metrics[-1]
    return {"seconds_per_step": statistics.median(seconds),
            "seconds_per_epoch": sum(seconds) / passes, "train_loss": final["train_loss"],
            "test_accuracy": final["test_accuracy"],
            "staleness_mean": result.summary.get("staleness_mean"),
            "total_seconds": result.summary["total_seconds"]}


def _report(runs, iterations, quick, repeats) -> dict[str, Any]:
    sync = runs["sync"]
    out: dict[str, Any] = {
        "benchmark": "bench_stale", "quick": quick, "repeats": repeats,
        "iterations": iterations, "slowdown": SLOWDOWN, "workers": 4,
        "machine": "shared 2-core machine (other jobs running): read the ratios",
        "setup": "mlp(40->64->4), adam(0.01), 16 chunks, 1 task per chunk, 1 group per "
                 "worker, real arrival order, one worker slowed 3x by sleeping",
        "runs": runs,
    }
    for name, measured in runs.items():
        out[name] = {
            "seconds_per_step": statistics.median(m["seconds_per_step"] for m in measured),
            "step_ratio_to_sync": _ratio(measured, sync, "seconds_per_step"),
            "step_ratio_to_S0": _ratio(measured, runs["S0"], "seconds_per_step"),
            "seconds_per_epoch": statistics.median(m["seconds_per_epoch"] for m in measured),
            "epoch_ratio_to_sync": _ratio(measured, sync, "seconds_per_epoch"),
            "epoch_ratio_to_S0": _ratio(measured, runs["S0"], "seconds_per_epoch"),
            "train_loss": statistics.median(m["train_loss"] for m in measured),
            "train_loss_minus_sync": statistics.median(
                m["train_loss"] - s["train_loss"] for m, s in zip(measured, sync, strict=True)),
            "test_accuracy": statistics.median(m["test_accuracy"] for m in measured),
            "staleness_mean": measured[0]["staleness_mean"],
            "total_seconds_ratio_to_sync": _ratio(measured, sync, "total_seconds"),
            **({"iterations": [m["iterations"] for m in measured]}
               if "iterations" in measured[0] else {}),
        }
    return out


def _ratio(measured, reference, key: str) -> float:
    """Median over repeats of the ratio within each repeat (both sides measured together)."""
    return statistics.median(m[key] / r[key] for m, r in zip(measured, reference, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = run(args.quick, args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
