"""FedBuff (buffered asynchronous FL) against synchronous FedAvg on one simulated clock.

Run ``python -m benchmarks.bench_fedbuff [--quick] [--seeds N] [--out FILE]`` from the
repository root; prints one JSON object.

The problem is issue 19's: scikit-learn's digits (standardised), an MLP with 64 hidden units,
100 clients with Dirichlet(0.5) labels, 2 local epochs, batch 10, client lr 0.05. Client speeds
are two-tier: 20 % of the clients (picked by the seed) are 10x slower, and a client's time per
task grows with its rows (:func:`fedpipe.tasks.fedbuff.durations`). Both sides run on the same
virtual clock, one after the other for each seed:

* sync: FedAvg, 10 clients sampled per round; a round lasts as long as its slowest client
  (:func:`fedpipe.tasks.fedbuff.sync_round_time`); test accuracy after every round.
* async: FedBuff, ``K = 10`` updates per server step (the same 10 updates per model change as a
  sync round), at most 20 clients in flight, staleness weight ``1/(1+s)^0.5``, no staleness
  bound; test accuracy after every version; run until the sync run's last clock time.

The target is the sync run's final test accuracy; each side's time to target is the simulated
time of its first evaluation at or above it. Reported: the async/sync ratio of those times
(issue target <= 0.5) and the final accuracies at the same simulated time (the sync run's
end), whose gap the issue wants within 0.01. Times are simulated, so the ratios do not depend on
the (shared, 2-core) machine's load; wall seconds of each side are given for reference only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from fedpipe.data import store
from fedpipe.data.ingest import ingest
from fedpipe.data.partition import partition
from fedpipe.engine import placement
from fedpipe.engine.federate import federate
from fedpipe.tasks import fedbuff, models, sampling

CLIENTS, PER_ROUND, CONCURRENCY, EXPONENT = 100, 10, 20, 0.5
SPEEDS = fedbuff.two_tier(0.2, 10.0)
TRAIN = dict(local_epochs=2, batch_size=10, lr=0.05)


class _Stop(Exception):
    """Raised by the async run's record callback once the simulated time budget is spent."""


def make_store(workdir: str) -> tuple[str, dict[str, int]]:
    url = os.path.join(workdir, "digits.zarr")
    ingest("sklearn:digits", url, standardize=True, progress=False, overwrite=True)
    partition(url, clients=CLIENTS, scheme="dirichlet", alpha=0.5, seed=0, name="dir100")
    info = store.read_info(url)
    return url, {c: int(m["n_rows"]) for c, m in info.partitions["dir100"]["clients"].items()}


def sync_side(url: str, dc, rows: dict[str, int], rounds: int, seed: int) -> dict:
    info = store.read_info(url)
    model = models.mlp(info.n_features, len(info.classes), hidden=(64,))
    durations = fedbuff.durations(SPEEDS, rows, seed)
    clients = placement.sort_clients(list(rows))
    start = time.perf_counter()
    run = federate(url, model, rounds=rounds, partition="dir100", clients_per_round=PER_ROUND,
                   seed=seed, dask_client=dc, **TRAIN)
    seconds = time.perf_counter() - start
    clock, curve = 0.0, []
    for rec in run.metrics:
        sampled = sampling.sample_clients(clients, rec["round"], seed, count=PER_ROUND)
        clock += fedbuff.sync_round_time(durations, sampled)
        curve.append((clock, rec["test_accuracy"]))
    return {"curve": curve, "wall_seconds": seconds}


def async_side(url: str, dc, rows: dict[str, int], budget: float, seed: int) -> dict:
    info = store.read_info(url)
    model = models.mlp(info.n_features, len(info.classes), hidden=(64,))
    mode = fedbuff.buffered(buffer_size=PER_ROUND, max_concurrency=CONCURRENCY,
                            staleness_exponent=EXPONENT, speeds=SPEEDS)
    curve: list[tuple[float, float]] = []
    stale: list[float] = []

    def record(rec: dict) -> None:
        curve.append((rec["virtual_time"], rec["test_accuracy"]))
        stale.append(rec["staleness"]["mean"])
        if rec["virtual_time"] >= budget:
            raise _Stop

    start = time.perf_counter()
    try:  # a version cap far beyond the budget: the callback ends the run
        federate(url, model, rounds=100_000, partition="dir100", mode=mode, seed=seed,
                 dask_client=dc, on_record=record, **TRAIN)
    except _Stop:
        pass
    return {"curve": curve, "wall_seconds": time.perf_counter() - start,
            "versions": len(curve), "staleness_mean": statistics.mean(stale)}


def _first_at(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def _at_time(curve: list[tuple[float, float]], t: float) -> float:
    """Accuracy of the last evaluation at or before simulated time ``t``."""
    return [acc for when, acc in curve if when <= t][-1]


def compare(url: str, dc, rows: dict[str, int], rounds: int, seed: int) -> dict:
    sync = sync_side(url, dc, rows, rounds, seed)
    end, target = sync["curve"][-1]
    asyn = async_side(url, dc, rows, end, seed)
    t_sync, t_async = _first_at(sync["curve"], target), _first_at(asyn["curve"], target)
    return {"seed": seed, "target_accuracy": target, "sync_time_to_target": t_sync,
            "async_time_to_target": t_async,
            "ratio_async_over_sync": None if t_async is None else t_async / t_sync,
            "sync_final_accuracy": target, "async_accuracy_at_sync_end": _at_time(
                asyn["curve"], end), "async_best_accuracy": max(a for _, a in asyn["curve"]),
            # after as many client updates as the sync run (K per version, K per round)
            "async_accuracy_at_same_updates": asyn["curve"][min(rounds, len(asyn["curve"])) - 1][1],
            "sync_rounds": rounds, "sync_end_time": end, "async_versions": asyn["versions"],
            "async_staleness_mean": asyn["staleness_mean"],
            "wall_seconds": {"sync": sync["wall_seconds"], "async": asyn["wall_seconds"]}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 sync rounds, one seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    parser.add_argument("--rounds", type=int, default=30, help="sync rounds (default 30)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    rounds, seeds = (10, 1) if args.quick else (args.rounds, args.seeds)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-fedbuff-") as workdir:
        url, rows = make_store(workdir)
        groups = placement.assign_clients(rows, 2)
        with placement.simulation_cluster(groups) as dc:
            for seed in range(seeds):
                runs.append(compare(url, dc, rows, rounds, seed))
    ratios = [r["ratio_async_over_sync"] for r in runs]
    gaps = [r["sync_final_accuracy"] - r["async_accuracy_at_sync_end"] for r in runs]
    result = {"benchmark": "fedbuff", "quick": args.quick, "machine_cpus": os.cpu_count(),
              "setup": {"clients": CLIENTS, "partition": "dirichlet(0.5)", "model": "mlp(64)",
                        "speeds": SPEEDS.spec, "sync_clients_per_round": PER_ROUND,
                        "buffer_size": PER_ROUND, "max_concurrency": CONCURRENCY,
                        "staleness_exponent": EXPONENT, "max_staleness": None, **TRAIN},
              "runs": runs,
              "median_ratio_async_over_sync": None if None in ratios
              else statistics.median(ratios),
              "max_accuracy_gap_sync_minus_async": max(gaps)}
    result["targets"] = {
        "time_to_target_ratio_le_0.5": result["median_ratio_async_over_sync"] is not None
        and result["median_ratio_async_over_sync"] <= 0.5,
        "final_accuracy_within_0.01": result["max_accuracy_gap_sync_minus_async"] <= 0.01}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
