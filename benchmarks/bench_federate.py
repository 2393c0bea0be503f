"""FedAvg per-round time against a plain serial NumPy loop doing the same work; memory; accuracy.

Run ``python -m benchmarks.bench_federate [--quick] [--only SECTION] [--repeats N] [--out FILE]``
from the repository root (``--only speed``: the 100 and 1,000 client targets); prints one JSON
object.
The problem is the issue's: FedAvg of a logistic regression on ``make_classification`` rows
(200,000 x 50, 20 informative), IID clients, every client every round, 1 local epoch, batch
256, lr 0.1.

* ``speed``: for 100 and 1,000 clients, the median per-round wall time of ``federate`` (2 worker
  processes, one batched task per worker per round, evaluation only after the last round) and of
  a serial loop over the same clients calling the same ``fedpipe.tasks.local.local_train`` on rows held
  in memory, with default BLAS threads and with one (as each worker has), one round of each
  run between federated rounds (same machine load); the ratio to the faster serial loop is
  what to read (the machine is shared). Round 0 (rows read from the store into the workers'
  caches) is left out of the medians. Each of the two client counts runs ``--repeats`` times
  (default 3, a fresh cluster each time) and the median of the runs' ratios is reported, with
  every run's figures beside it: on a shared 2-core machine one run's ratio moves by +-20 %.
* ``scale``: per-round time at 100, 1,000 and 10,000 clients and seconds per client-round.
* ``memory``: driver and worker RSS after round 50 and after round 500 of one run at 1,000
  clients evaluated every round (``--memory-clients``, ``--memory-rounds``; a reduced
  problem, stated in the output, so 500 rounds fit in a benchmark).
* ``accuracy``: test accuracy of ``federate`` and of the serial loop after the same rounds.
* ``digits``: non-IID accuracy — scikit-learn's digits (standardised), MLP (64 hidden units),
  100 clients with Dirichlet(0.5) labels, 50 rounds, 2 local epochs, batch 10, lr 0.05, for
  FedAvg, FedProx (mu 0.1) and FedAdam (server lr 0.01); the first round reaching 0.90.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import tempfile
import time

import numpy as np
import psutil
from fedpipe.data import store
from fedpipe.data.ingest import ingest_arrays
from fedpipe.data.partition import partition
from fedpipe.engine import placement
from fedpipe.engine.federate import federate
from fedpipe.tasks import local, models

LR, BATCH, EPOCHS, TEST_FRACTION, SEED = 0.1, 256, 1, 0.2, 0


def make_store(path: str, n_rows: int, n_features: int, clients: int) -> str:
    """Synthetic rows as a fedpipe store with an IID partition ``iid`` among ``clients``.

    One store per client count: a store's metadata lists every client of every partition.
    """
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=n_rows, n_features=n_features, n_informative=20,
                               random_state=0)
    ingest_arrays(X, y, path, chunk_rows=min(n_rows, 4096), progress=False, overwrite=True)
    partition(path, clients=clients, scheme="iid", seed=0, name="iid")
    return "iid"


def client_data(url: str, name: str) -> dict[str, tuple[np.ndarray, ...]]:
    """Every client's train and test rows in memory, exactly as the workers see them."""
    info, group = store.read_info(url), store.open_group(url)
    data = {}
    for client in placement.sort_clients(list(info.partitions[name]["clients"])):
        parts = []
        for split in ("train", "test"):
            chunks = [store.read_chunk(url, ref, split=split, test_fraction=TEST_FRACTION,
                                       seed=SEED, info=info, group=group)
                      for ref in store.chunk_refs(info, partition=name, client=client)]
            parts += [np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])]
        data[client] = tuple(parts)
    return data


class SerialLoop:
    """The plain loop: every client trains in turn, then the n-weighted mean delta is added.

    One :meth:`step` is one round; it keeps its own params, so two loops (default BLAS and one
    BLAS thread) can run side by side between the rounds of ``federate``.
    """

    def __init__(self, model: models.Model, data: dict, blas_threads: int | None) -> None:
        self.model, self.data, self.blas_threads = model, data, blas_threads
        self.params, self.round, self.seconds = model.init(SEED), 0, []

    def step(self) -> None:
        from threadpoolctl import threadpool_limits

        limit = (threadpool_limits(limits=self.blas_threads, user_api="blas")
                 if self.blas_threads else contextlib.nullcontext())
        with limit:
            start = time.perf_counter()
            total, weight = np.zeros_like(self.params), 0.0
            for client, (X, y, _, _) in self.data.items():
                out = local.local_train(self.model, self.params, X, y, epochs=EPOCHS,
                                        batch_size=BATCH, lr=LR,
                                        rng=local.client_rng(SEED, self.round, client))
                total += out.packet["delta"] * len(y)
                weight += len(y)
            self.params = self.params + total / weight
            self.seconds.append(time.perf_counter() - start)
        self.round += 1

    def accuracy(self) -> float:
        Xt = np.concatenate([d[2] for d in self.data.values()])
        yt = np.concatenate([d[3] for d in self.data.values()])
        return float(np.mean(self.model.predict(self.params, Xt) == yt))


def federated(url: str, name: str, model: models.Model, rounds: int, workers: int = 2,
              on_record=None) -> tuple[list[float], float]:
    """Per-round seconds and final test accuracy of ``federate`` on its own cluster."""
    run = federate(url, model, rounds=rounds, partition=name, local_epochs=EPOCHS,
                   batch_size=BATCH, lr=LR, seed=SEED, test_fraction=TEST_FRACTION,
                   eval_every=rounds, workers=workers, on_record=on_record)
    return [rec["seconds"] for rec in run.metrics], run.summary["test_accuracy"]


def _step_all(loops: list[SerialLoop], _record: dict) -> None:
    for loop in loops:
        loop.step()


def _median(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def speed_and_scale(workdir: str, n_rows: int, clients: list[int], rounds: int,
                    serial_for: set[int], repeats: int = 1) -> dict:
    """Per-round times; for ``serial_for`` client counts, serial rounds run between its rounds.

    ``federate`` leaves ``on_record`` out of its round time, so one round of each serial loop
    (default BLAS, one BLAS thread) runs there, under the same machine load as the round
    before it; the ratio is taken to the faster of the two. With ``repeats`` > 1 each of the
    ``serial_for`` client counts is run that many times (a fresh cluster and fresh serial loops each time) and the
    ratio reported is the median of the runs' ratios; every run's figures are kept.
    """
    out: dict = {"rows": n_rows, "features": 50, "rounds": rounds, "repeats": repeats,
                 "clients": {}, "cluster": "2 worker processes x 1 thread, 1 BLAS thread"}
    model = models.logistic(50)
    for k in clients:
        url = os.path.join(workdir, f"bench-{k}.zarr")
        start = time.perf_counter()
        name = make_store(url, n_rows, 50, k)
        setup = time.perf_counter() - start
        data = client_data(url, name) if k in serial_for else None
        runs = [_speed_run(url, name, model, rounds, k, data)
                for _ in range(repeats if data is not None else 1)]
        entry = {"store_setup_s": setup, **runs[0]}
        if len(runs) > 1:  # medians of the runs up front, each run's figures under "runs"
            entry = {"store_setup_s": setup, "runs": runs,
                     "accuracy_gap": max(r["accuracy_gap"] for r in runs)}
            for key in ("federate_s_per_round", "serial_s_per_round",
                        "serial_1blas_s_per_round", "ratio_federate_over_serial"):
                entry[key] = statistics.median(r[key] for r in runs)
                entry[f"{key}_runs"] = [r[key] for r in runs]
            entry["federate_s_per_client_round"] = entry["federate_s_per_round"] / k
        out["clients"][str(k)] = entry
    return out


def _speed_run(url: str, name: str, model: models.Model, rounds: int, k: int,
               data: dict | None) -> dict:
    """One federated run of ``k`` clients, with the serial loops' rounds between its rounds."""
    loops = [] if data is None else [SerialLoop(model, data, None), SerialLoop(model, data, 1)]
    fed_seconds, fed_acc = federated(url, name, model, rounds,
                                     on_record=functools.partial(_step_all, loops))
    entry = {"federate_s_per_round": _median(fed_seconds),
             "federate_first_round_s": fed_seconds[0],
             "federate_s_per_round_all": [round(t, 4) for t in fed_seconds],
             "federate_test_accuracy": fed_acc}
    entry["federate_s_per_client_round"] = entry["federate_s_per_round"] / k
    if loops:
        default, one = (_median(lp.seconds) for lp in loops)
        serial_acc = loops[0].accuracy()
        entry |= {"serial_s_per_round": default, "serial_1blas_s_per_round": one,
                  "serial_test_accuracy": serial_acc,
                  "ratio_federate_over_serial": entry["federate_s_per_round"] / min(default, one),
                  "ratio_federate_over_serial_default_blas":
                      entry["federate_s_per_round"] / default,
                  "ratio_federate_over_serial_1blas": entry["federate_s_per_round"] / one,
                  "accuracy_gap": abs(fed_acc - serial_acc)}
    return entry


def _rss(_=None) -> int:
    return psutil.Process().memory_info().rss


def memory(workdir: str, n_rows: int, clients: int, checkpoints: tuple[int, int],
           eval_every: int = 1) -> dict:
    """Driver and worker RSS after two round counts of one run (flat = within a few %),
    evaluating every ``eval_every`` rounds; RSS is also sampled every 10 % of the run so a
    shorter run's slope can be read."""
    url = os.path.join(workdir, "memory.zarr")
    name = make_store(url, n_rows, 50, clients)
    info = store.read_info(url)
    rows = {c: m["n_rows"] for c, m in info.partitions[name]["clients"].items()}
    samples: dict[int, dict] = {}
    with placement.simulation_cluster(placement.assign_clients(rows, 2)) as dc:
        def sample(record: dict) -> None:
            done = record["round"] + 1
            if done in checkpoints or done % max(1, checkpoints[1] // 10) == 0:
                workers = dc.run(_rss)
                samples[done] = {"driver": _rss(), "workers": sum(workers.values())}

        started = time.perf_counter()
        federate(url, models.logistic(50), rounds=checkpoints[1], partition=name,
                 local_epochs=EPOCHS, batch_size=BATCH, lr=LR, eval_every=eval_every,
                 dask_client=dc, on_record=sample)
        seconds = time.perf_counter() - started
    early, late = samples[checkpoints[0]], samples[checkpoints[1]]
    return {"rows": n_rows, "clients": clients, "rounds": list(checkpoints),
            "eval_every": eval_every, "seconds": seconds,
            "rss_mb_by_round": {r: [v["driver"] / 1e6, v["workers"] / 1e6]
                                for r, v in sorted(samples.items())},
            "driver_rss_mb": [early["driver"] / 1e6, late["driver"] / 1e6],
            "workers_rss_mb": [early["workers"] / 1e6, late["workers"] / 1e6],
            "driver_growth": late["driver"] / early["driver"] - 1,
            "workers_growth": late["workers"] / early["workers"] - 1}


def _client_ids_every_round(spec, j, group, chosen=None):
    """What a round's task was told of its clients before issue 12: the ids themselves."""
    mine = list(group) if chosen is None else [c for c in group if c in chosen]
    return mine or None


def memory_side_by_side(workdir: str, clients: int, checkpoints: tuple[int, int]) -> dict:
    """:func:`memory` with the client ids sent every round (as before) and by group index."""
    from fedpipe.engine import fed_round

    placed = fed_round._of
    out = {}
    try:
        fed_round._of = _client_ids_every_round
        out["ids_every_round"] = memory(workdir, 20_000, clients, checkpoints)
    finally:
        fed_round._of = placed
    out["groups_placed_once"] = memory(workdir, 20_000, clients, checkpoints)
    return out


def digits(workdir: str, rounds: int) -> dict:
    """Test accuracy every 5 rounds of FedAvg, FedProx and FedAdam on non-IID digits."""
    from fedpipe.data.ingest import ingest
    from fedpipe.tasks import aggregate

    url = os.path.join(workdir, "digits.zarr")
    ingest("sklearn:digits", url, standardize=True, progress=False, overwrite=True)
    partition(url, clients=100, scheme="dirichlet", alpha=0.5, seed=0, name="dir100")
    info = store.read_info(url)
    out = {}
    for strategy in (aggregate.fedavg(), aggregate.fedprox(0.1), aggregate.fedadam(0.01)):
        model = models.mlp(info.n_features, len(info.classes), hidden=(64,))
        run = federate(url, model, rounds=rounds, partition="dir100", strategy=strategy,
                       local_epochs=2, batch_size=10, lr=0.05, eval_every=5, workers=2)
        curve = {rec["round"] + 1: rec["test_accuracy"] for rec in run.metrics
                 if "test_accuracy" in rec}
        reached = [r for r, acc in curve.items() if acc >= 0.90]
        out[strategy.name] = {"accuracy_by_round": curve, "final": curve[rounds],
                              "first_round_at_0.90": reached[0] if reached else None}
    return out


SECTIONS = ("speed", "memory", "digits")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (about a minute)")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="run only this section (repeatable; default: all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="speed: runs per client count; the median ratio is reported "
                             "(default 3)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--memory-clients", type=int, default=1000,
                        help="memory: clients of the run (default 1,000, every round evaluated)")
    parser.add_argument("--memory-rounds", type=int, nargs=2, metavar=("EARLY", "LATE"),
                        help="memory: the two round counts compared (default 50 500; quick 10 40)")
    args = parser.parse_args(argv)
    sections = args.only or list(SECTIONS)
    if args.quick:
        rows, clients, rounds, mem = 20_000, [100, 1000], 4, (10, 40)
    else:
        rows, clients, rounds, mem = 200_000, [100, 1000, 10_000], 21, (50, 500)
    if args.only == ["speed"]:
        clients = clients[:2]  # the two targets; 10,000 clients is the scale check
    result: dict = {"benchmark": "federate", "quick": args.quick, "sections": sections,
                    "machine_cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-federate-") as workdir:
        if "speed" in sections:
            result["speed"] = speed_and_scale(workdir, rows, clients, rounds, {100, 1000},
                                              1 if args.quick else args.repeats)
        if "memory" in sections:
            result["memory"] = memory_side_by_side(workdir, args.memory_clients,
                                                   tuple(args.memory_rounds or mem))
        if "digits" in sections:
            result["digits"] = digits(workdir, 10 if args.quick else 50)
    result["targets"] = _targets(result)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


def _targets(result: dict) -> dict:
    out: dict = {}
    if "speed" in result:
        per_k = result["speed"]["clients"]
        out |= {"ratio_100_le_1.0": per_k["100"]["ratio_federate_over_serial"] <= 1.0,
                "ratio_1000_le_1.5": per_k["1000"]["ratio_federate_over_serial"] <= 1.5,
                "accuracy_within_0.005": all(v["accuracy_gap"] <= 0.005 for v in per_k.values()
                                             if "accuracy_gap" in v)}
        if "10000" in per_k:
            per_client = [per_k[k]["federate_s_per_client_round"] for k in ("1000", "10000")]
            out["s_per_client_round_1000_vs_10000"] = per_client
    if "memory" in result:
        now = result["memory"]["groups_placed_once"]
        out["memory_flat_5pct"] = max(now["driver_growth"], now["workers_growth"]) <= 0.05
    if "digits" in result:
        first = result["digits"]["fedavg"]["first_round_at_0.90"]
        out["digits_fedavg_0.90_within_50_rounds"] = first is not None and first <= 50
    return out


if __name__ == "__main__":
    main()
