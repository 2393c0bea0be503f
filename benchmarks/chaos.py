"""Long fault runs with real process kills: the figures of ``docs/reliability.md``.

Run ``make chaos`` or ``python -m benchmarks.chaos [--quick] [--only train|federate]
[--rounds N] [--deadline S] [--out FILE]`` from the repository root; prints one JSON object.

* ``train``: 200 full-batch iterations on a 2-worker LocalCluster (nanny-managed processes),
  one worker SIGKILLed by PID every ~10 iterations (a kill waits until the worker killed before
  is back and ``SETTLE`` iterations have run since: one fault at a time, on a recovered
  cluster, never on none). Reports whether the parameters are
  bit-identical to a fault-free run on the same cluster, how many ``KilledWorker`` errors
  reached the driver, the time until the scheduler noticed each kill, and the kill iteration's
  and the next iteration's time as ratios to the median fault-free iteration.
* ``federate``: federated rounds (10 clients on 5 simulation workers, ``--deadline``) with one
  random client worker SIGKILLed by PID at a random moment of every round. Reports the rounds
  completed, the clients aggregated per round and each round's time against its deadline budget
  (a train wave and an eval wave, each bounded by the deadline).

The machine may be shared: compare the ratios, which come from one run, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import tempfile
import threading
import time

import numpy as np
from distributed import Client

N_ROWS, N_FEATURES, CHUNK_ROWS = 200_000, 20, 10_000
SEED = 0
SETTLE = 10  # iterations a restarted worker has before the next kill


def make_store(path: str) -> str:
    """A classification store, partitioned among 10 clients as ``fed``."""
    from fedpipe.data.ingest import ingest
    from fedpipe.data.partition import partition

    ingest(f"synthetic:classification?n_samples={N_ROWS}&n_features={N_FEATURES}&n_classes=2"
           f"&seed={SEED}", path, chunk_rows=CHUNK_ROWS, progress=False)
    partition(path, clients=10, name="fed", seed=SEED)
    return path


def worker_pids(dask_client: Client) -> dict[str, int]:
    return dask_client.run(os.getpid)


def watch_removals(dask_client: Client, kills: list[dict], stop: threading.Event) -> None:
    """Record when the scheduler no longer lists each killed worker (detection time)."""
    while not stop.is_set():
        known = set(dask_client.scheduler_info(n_workers=-1)["workers"])
        for kill in kills:
            if "detected_s" not in kill and kill["address"] not in known:
                kill["detected_s"] = time.perf_counter() - kill["at"]
        time.sleep(0.02)


def train_chaos(store: str, iterations: int, every: int) -> dict:
    """Fault-free run, then the same run with a worker killed every ``every`` iterations."""
    from fedpipe import cluster
    from fedpipe.engine.train import fit
    from fedpipe.tasks import models, optimizers

    model, optimizer = models.logistic(N_FEATURES), optimizers.adam(0.05)
    with cluster.connect(workers=2, threads=1) as dc:
        clean = fit(store, model, optimizer, iterations=iterations, dask_client=dc, seed=SEED)
        kills: list[dict] = []
        whole = {"since": 0}  # the iteration from which both workers are running again

        def kill_one(record: dict) -> None:
            it = record["iteration"]
            due = (len(kills) + 1) * every  # the next kill; deferred while one is not back
            alive = sorted(worker_pids(dc).items())
            if len(alive) < 2:
                whole["since"] = it + 1
            # One fault at a time: a kill comes once the cluster has recovered from the last
            # (the worker is back and SETTLE iterations have run since), not mid-recovery.
            if due <= it < iterations and len(alive) == 2 and it - whole["since"] >= SETTLE:
                address, pid = alive[len(kills) % 2]
                kills.append({"iteration": it, "address": address, "at": time.perf_counter()})
                os.kill(pid, signal.SIGKILL)
                whole["since"] = it + 1

        stop = threading.Event()
        watcher = threading.Thread(target=watch_removals, args=(dc, kills, stop), daemon=True)
        watcher.start()
        killed_worker_errors, error = 0, None
        try:
            faulty = fit(store, model, optimizer, iterations=iterations, dask_client=dc,
                         seed=SEED, on_record=kill_one)
        except Exception as exc:  # noqa: BLE001 - reported, not raised: this is the figure
            killed_worker_errors += "KilledWorker" in type(exc).__name__
            faulty, error = None, f"{type(exc).__name__}: {exc}"[:300]
        finally:
            stop.set()
            watcher.join()
    return {**_train_figures(clean, faulty, kills, killed_worker_errors, iterations),
            "error": error}


def _train_figures(clean, faulty, kills, killed_worker_errors, iterations) -> dict:
    base = statistics.median(r["seconds"] for r in clean.metrics[1:])
    secs = {r["iteration"]: r["seconds"] for r in (faulty.metrics if faulty else [])}
    # a kill after iteration t's record hits iteration t + 1
    hit = [secs.get(k["iteration"] + 1, float("nan")) / base for k in kills]
    after = [secs.get(k["iteration"] + 2, float("nan")) / base for k in kills]
    detected = [k.get("detected_s", float("nan")) for k in kills]
    return {
        "iterations": iterations, "kills": len(kills), "completed": faulty is not None,
        "bit_identical": bool(faulty is not None
                              and faulty.params.tobytes() == clean.params.tobytes()),
        "killed_worker_errors": killed_worker_errors,
        "median_iteration_s": base,
        "detection_s": {"max": max(detected), "median": statistics.median(detected)},
        "kill_iteration_ratio": {"max": max(hit), "median": statistics.median(hit)},
        "next_iteration_ratio": {"max": max(after), "median": statistics.median(after)},
        # each kill's figures, in order: a median over a handful of kills hides which one
        # was slow and why (e.g. the worker that held every chunk, or a fresh worker's first
        # tasks)
        "per_kill": [{"iteration": k["iteration"] + 1, "kill": round(h, 2), "next": round(a, 2)}
                     for k, h, a in zip(kills, hit, after, strict=True)],
    }


def federate_chaos(store: str, rounds: int, deadline: float) -> dict:
    """Rounds with one random client worker killed at a random moment of each round."""
    from fedpipe.data.store import read_info
    from fedpipe.engine import placement
    from fedpipe.engine.federate import federate
    from fedpipe.tasks import models

    info = read_info(store)
    rows = {c: m["n_rows"] for c, m in info.partitions["fed"]["clients"].items()}
    rng = random.Random(SEED)
    seconds, last = [], [time.perf_counter()]
    with placement.simulation_cluster(placement.assign_clients(rows, 5)) as dc:

        def kill_later(record: dict) -> None:
            now = time.perf_counter()
            seconds.append(now - last[0])
            last[0] = now
            pid = rng.choice(sorted(worker_pids(dc).values()))
            threading.Timer(rng.uniform(0.0, 0.3), _kill, (pid,)).start()

        run = federate(store, models.logistic(N_FEATURES), rounds=rounds, partition="fed",
                       deadline=deadline, dask_client=dc, on_record=kill_later, lr=0.1,
                       batch_size=256, seed=SEED)
    aggregated = [r["aggregated"] for r in run.metrics]
    budget = 2 * (deadline + 1.0)  # a train and an eval wave, each deadline + fetch grace
    return {"rounds": rounds, "completed": len(run.metrics), "clients": len(rows),
            "deadline_s": deadline, "aggregated": {"min": min(aggregated),
                                                   "median": statistics.median(aggregated)},
            "rounds_with_9_of_10": sum(a >= 9 for a in aggregated),
            "round_over_budget": {"max": max(seconds[1:]) / budget,
                                  "median": statistics.median(seconds[1:]) / budget},
            "final_params_finite": bool(np.isfinite(run.params).all())}


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already restarted


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 iterations, 5 rounds")
    # 200: a kill waits until the worker killed before is back, so 100 iterations met only 5
    # kills, too few for a steady median
    parser.add_argument("--iterations", type=int, default=200,
                        help="full-batch iterations of the train part (default 200)")
    parser.add_argument("--rounds", type=int, default=50, help="federated rounds (default 50)")
    # the first round of a cold cluster reads and caches every client's rows: on a loaded
    # 2-core machine that alone took 16 s
    parser.add_argument("--deadline", type=float, default=20.0)
    parser.add_argument("--only", choices=("train", "federate"), help="run one part")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    iterations, rounds = (20, 5) if args.quick else (args.iterations, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(os.path.join(tmp, "chaos.zarr"))
        result = {}
        if args.only in (None, "train"):
            result["train"] = train_chaos(store, iterations, every=10)
            print(json.dumps(result), flush=True)
        if args.only in (None, "federate"):
            try:
                result["federate"] = federate_chaos(store, rounds, args.deadline)
            except Exception as exc:  # noqa: BLE001 - a failed run is a figure too
                result["federate"] = {"rounds": rounds,
                                      "error": f"{type(exc).__name__}: {exc}"[:300]}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
