"""Privacy, robustness and compression: overheads, byte counts and the attack table.

Run ``python -m benchmarks.bench_privacy [--quick] [--only SECTION] [--out FILE]`` from the
repository root; prints one JSON object and writes it to ``benchmarks/results/privacy.json``
(``--out`` to change; with ``--only`` the file's other sections are kept). ``--quick`` shrinks
every section so it runs in well under a minute.

* ``overhead``: clip + noise against a round's client work at 100 clients: the serial time of
  100 clients' local training (digits, MLP 64, 1 epoch, batch 10) and of the aggregation chain
  with and without ``clip -> dp_mean -> gaussian_noise``.
* ``robust``: one aggregation of K x d updates (1,000 x 10,000 in full) for the mean (a sum),
  median, trimmed mean, Krum and Multi-Krum; ratios to the mean. Krum is O(K^2 d): its time
  at K/4, K/2 and K shows the growth.
* ``robust_round``: what a user gets from ``fedpipe federate --aggregator RULE``: the median
  wall time of a federated round (``federate`` on 2 in-process workers, local training
  included, round 0 left out) with each rule (the CLI's defaults) against the mean, at
  1,000 clients x 10,000 parameters (softmax, 20 rows per client; 200 x 2,000 with --quick).
* ``compression``: bytes per client per round for float64, fp16, int8 and top-1 %, and their
  ratios; digits accuracy after the same rounds with and without each.
* ``attacks``: final digits test accuracy per (rule x attack), 100 Dirichlet(0.5) clients, 20 %
  SIMULATED attackers (:mod:`fedpipe.tasks.attacks`), against the clean run.

The federated rounds here are a serial NumPy simulation of the engine's round: the same
``local_train``, ``client_side``, ``add_packets`` and ``server_side`` the workers and the driver
call, in one process, so a table of 36 runs fits a benchmark on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
from fedpipe.tasks import (
    aggregate,
    aggregators,
    attacks,
    compress,
    local,
    models,
    partition,
    robust,
)
from fedpipe.tasks import privacy as dp
from fedpipe.tasks.privacy import CLIENT_ID, client_tag

RESULTS = pathlib.Path(__file__).parent / "results" / "privacy.json"


def digits(clients: int, seed: int = 0):
    """Standardised digits split 80/20, train rows spread over Dirichlet(0.5) clients."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X - X.mean(0)) / (X.std(0) + 1e-8)
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[: len(y) // 5], order[len(y) // 5:]
    owner = partition.dirichlet(y[train], clients, 0.5, seed, min_size=2)
    parts = [(X[train][owner == c], y[train][owner == c]) for c in range(clients)]
    return parts, (X[test], y[test])


def simulate(chain, parts, test, rounds, *, lr=0.05, seed=0, flip=frozenset(), hidden=64):
    """FedAvg rounds of the engine's arithmetic in one process; returns the test accuracy and
    the mean bytes a client sent per round."""
    model = models.mlp(parts[0][0].shape[1], 10, hidden=(hidden,), task="multiclass")
    params = model.init(seed)
    states = aggregate.init_states(chain, model.n_params)
    opt = aggregate.fedavg().server
    opt_state, kept, sent_bytes = opt.init(params), {}, []
    for r in range(rounds):
        packets = []
        for c, (X, y) in enumerate(parts):
            if c in flip:
                y = attacks.flip_labels(y, 10)
            res = local.local_train(model, params, X, y, epochs=1, batch_size=10, lr=lr,
                                    rng=local.client_rng(seed, r, str(c)))
            extra = {**kept.get(c, {}), CLIENT_ID: np.asarray(client_tag(str(c)), np.uint64)}
            packet, _ = aggregate.client_side(chain, states, {**res.packet, **extra})
            if packet is None:
                continue
            packet, mine = aggregate.split_local(packet)
            kept[c] = {k: v for k, v in mine.items() if k != CLIENT_ID}
            sent_bytes.append(aggregate.wire_bytes(packet))
            packets.append(packet)
        total, states, _ = aggregate.server_side(chain, states, aggregate.add_packets(*packets))
        params, opt_state = aggregate.server_step(opt, params, opt_state, total["delta"])
    pred = np.asarray(model.predict(params, test[0]))
    pred = pred.argmax(axis=1) if pred.ndim == 2 else pred
    accuracy = float(np.mean(pred == test[1]))
    return accuracy, float(np.mean(sent_bytes))


def _time(fn, repeats=3) -> float:
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def overhead(quick: bool) -> dict:
    clients = 20 if quick else 100
    parts, _ = digits(clients)
    model = models.mlp(64, 10, hidden=(64,), task="multiclass")
    params = model.init(0)
    results = [local.local_train(model, params, X, y, epochs=1, batch_size=10, lr=0.05,
                                 rng=local.client_rng(0, 0, str(c)))
               for c, (X, y) in enumerate(parts)]
    train = _time(lambda: [local.local_train(model, params, X, y, epochs=1, batch_size=10,
                                             lr=0.05, rng=local.client_rng(0, 0, str(c)))
                           for c, (X, y) in enumerate(parts)], 1)

    def chain_time(chain):
        def once():
            states = aggregate.init_states(chain, model.n_params)
            sent = [aggregate.client_side(chain, states, r.packet)[0] for r in results]
            aggregate.server_side(chain, states, aggregate.add_packets(*sent))
        return _time(once, 5)

    plain = chain_time(aggregate.default_chain())
    private = chain_time((aggregate.validate(), dp.clip(1.0), dp.dp_mean(clients),
                          dp.gaussian_noise(1.0, 1.0)))
    return {"clients": clients, "n_params": model.n_params, "local_training_s": train,
            "chain_plain_s": plain, "chain_dp_s": private,
            "dp_overhead_of_round": (private - plain) / (train + plain)}


def dp_round(quick: bool, rounds: int = 20) -> dict:
    """A federated round with central DP (clip + noise) against the plain one, in the engine.

    ``fedpipe federate --dp central --clip 1 --noise-multiplier 1`` at its defaults (worker
    processes, evaluation every round) on digits over 100 Dirichlet(0.5) clients, the plain
    chain and the DP chain run twice each in turn (A B A B) on one cluster, so a drift in the
    machine's load falls on both; round 0 is left out.
    """
    import statistics
    import tempfile

    import fedpipe as fp
    from fedpipe.cli.registry import make_chain
    from fedpipe.engine import placement

    clients = 20 if quick else 100
    model = models.mlp(64, 10, hidden=(64,), task="multiclass")
    chains = {"plain": aggregate.default_chain(),
              "dp": make_chain(dp="central", clip=1.0, noise_multiplier=1.0, aggregator="mean",
                               compress=None, clients_per_round=clients, seed=0)}
    seconds: dict[str, list[float]] = {name: [] for name in chains}
    with tempfile.TemporaryDirectory() as tmp:
        url = f"{tmp}/digits.zarr"
        fp.ingest("sklearn:digits", url, standardize=True, progress=False)
        fp.partition(url, clients=clients, scheme="dirichlet", alpha=0.5, name="bench")
        rows = {c: m["n_rows"] for c, m in fp.read_info(url).partitions["bench"]["clients"].items()}
        with placement.simulation_cluster(placement.assign_clients(rows, 2)) as dc:
            for name in ("plain", "dp", "plain", "dp"):
                # Wall time between two rounds' records, what a user waits: it includes what
                # the driver does after a round (the accountant's ε), which a record's
                # "seconds" leaves out.
                stamps: list[float] = []
                fp.federate(url, model, rounds=rounds, stages=chains[name], lr=0.05,
                            batch_size=10, dask_client=dc, partition="bench",
                            on_record=lambda record, stamps=stamps: stamps.append(time.perf_counter()))
                seconds[name] += [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    plain, private = (statistics.median(seconds[n]) for n in ("plain", "dp"))
    return {"clients": clients, "rounds": rounds, "n_params": model.n_params,
            "plain_round_s": plain, "dp_round_s": private, "dp_over_plain": private / plain}


def robust_rules(quick: bool) -> dict:
    k, d = (200, 2000) if quick else (1000, 10_000)
    x = np.random.default_rng(0).normal(size=(k, d))
    f = k // 5
    mean = _time(lambda: aggregate.add_packets(*({"delta": row} for row in x)))
    timed = {"median": _time(lambda: robust.coordinate_median(x)),
             "trimmed_mean": _time(lambda: robust.trimmed_mean(x, f)),
             "krum": _time(lambda: robust.krum(x, f)),
             "multi_krum": _time(lambda: robust.multi_krum(x, f))}
    growth = {f"krum_s_at_K{k // q}": _time(lambda q=q: robust.krum(x[: k // q], f // q))
              for q in (4, 2)}
    return {"K": k, "d": d, "mean_s": mean, **{f"{n}_s": t for n, t in timed.items()},
            **growth, **{f"{n}_over_mean": t / mean for n, t in timed.items()}}


def robust_round(quick: bool, rounds: int = 8) -> dict:
    """Seconds per round of each rule against the mean's, at the defaults first.

    Defaults: worker processes (``fedpipe.local-processes``) and evaluation every round, what
    ``fedpipe federate --aggregator RULE`` does; beside them the setting measured before,
    in-process workers evaluated once at the end, which leaves the aggregation alone in the
    round. Round 0 (cold reads) is left out of each median.
    """
    import tempfile

    from fedpipe.data import store

    from benchmarks.bench_secagg import _store

    clients, params = (200, 2_000) if quick else (1_000, 10_000)
    n_features = params // 10 - 1  # softmax: (features + 1) x 10 classes
    out: dict = {"clients": clients, "params": params, "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        url = _store(tmp, clients, n_features)
        info = store.read_info(url)
        rows = {c: m["n_rows"] for c, m in info.partitions["bench"]["clients"].items()}
        model = models.softmax(n_features, 10)
        out["defaults"] = _rule_rounds(url, rows, model, rounds, processes=None, eval_every=1)
        out["threads_eval_once"] = _rule_rounds(url, rows, model, rounds, processes=False,
                                                eval_every=rounds)
        # Before the rules ran by column blocks on the workers: every row to the driver.
        out["defaults_rows_to_driver"] = _rule_rounds(url, rows, model, rounds, processes=None,
                                                      eval_every=1, by_columns=False)
    return out


def _rule_rounds(url, rows, model, rounds: int, *, processes, eval_every: int,
                 by_columns: bool = True) -> dict:
    import contextlib
    import statistics
    from unittest import mock

    from fedpipe.cli.registry import AGGREGATORS
    from fedpipe.engine import fed_round, placement
    from fedpipe.engine.federate import federate

    out: dict = {}
    off = (mock.patch.object(fed_round, "_columns", lambda spec, leaves: None) if not by_columns
           else contextlib.nullcontext())
    with off, placement.simulation_cluster(placement.assign_clients(rows, 2),
                                           processes=processes, dashboard_address=":0") as dc:
        for rule in ("mean", "median", "trimmed-mean", "krum"):
            chain = (aggregate.validate(), AGGREGATORS[rule]())
            run = federate(url, model, rounds=rounds, batch_size=32, lr=0.1, stages=chain,
                           dask_client=dc, eval_every=eval_every)
            out[f"{rule}_round_s"] = statistics.median(r["seconds"] for r in run.metrics[1:])
    for rule in ("median", "trimmed-mean", "krum"):
        out[f"{rule}_over_mean"] = out[f"{rule}_round_s"] / out["mean_round_s"]
    return out


def compression(quick: bool) -> dict:
    clients, rounds = (20, 5) if quick else (100, 50)
    parts, test = digits(clients)
    out = {"clients": clients, "rounds": rounds}
    base_acc, base_bytes = simulate(aggregate.default_chain(), parts, test, rounds)
    out["none"] = {"accuracy": base_acc, "bytes": base_bytes}
    for name, stage in (("fp16", compress.fp16()), ("int8", compress.int8()),
                        ("topk:0.01", compress.topk(0.01))):
        acc, sent = simulate((aggregate.validate(), stage, aggregate.weighted_mean()),
                             parts, test, rounds)
        out[name] = {"accuracy": acc, "bytes": sent, "ratio": base_bytes / sent}
    return out


RULES = {"mean": aggregators.mean, "median": aggregators.median,
         "trimmed-mean": lambda: aggregators.trimmed_mean(0.2),
         "krum": lambda: aggregators.krum(0.2), "multi-krum": lambda: aggregators.multi_krum(0.2),
         "centered-clip": lambda: aggregators.centered_clip(1.0)}


def attack_table(quick: bool) -> dict:
    clients, rounds = (20, 5) if quick else (100, 30)
    parts, test = digits(clients)
    fraction = 0.2
    flip = {c for c in range(clients) if attacks.is_attacker(client_tag(str(c)), fraction)}
    table: dict = {"clients": clients, "rounds": rounds, "attackers": len(flip)}
    for rule, make in RULES.items():
        row = {}
        for kind in attacks.ATTACKS:
            stage = attacks.simulated_attack(make(), kind, fraction)
            row[kind] = simulate((aggregate.validate(), stage), parts, test, rounds,
                                 flip=flip if kind == "label-flip" else frozenset())[0]
        table[rule] = row
    return table


SECTIONS = {"overhead": overhead, "dp_round": dp_round, "robust": robust_rules, "robust_round": robust_round,
            "compression": compression, "attacks": attack_table}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small configurations only")
    p.add_argument("--only", choices=list(SECTIONS), action="append")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    report = {}
    for name in args.only or SECTIONS:  # each section says its size: --only may mix runs
        report[name] = {"quick": args.quick, **SECTIONS[name](args.quick)}
    out = pathlib.Path(args.out)
    if args.only and out.exists():  # --only refreshes its sections, keeps the file's others
        report = {**json.loads(out.read_text()), **report}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
