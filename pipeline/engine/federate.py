"""Federated training: the round loop, on clients pinned to their own workers.

Every round: sample clients by ``(seed, round)`` -> broadcast the global params -> each worker
trains its resident sampled clients on rows cached on that worker and runs the client part of
the aggregation chain -> the packets are summed in a fixed order (the driver merges a couple of
worker reports; a ``sum-…`` tree on the workers adds many) -> the driver runs the server part
and the server optimizer -> clients evaluate the new params on their test rows. Clients late
for the deadline, on a dead worker, or with a rejected update are dropped from the round and
logged. All state of the run sits in one :class:`ServerState` on the driver (what the
checkpoint writes), except per-client state (SCAFFOLD's ``c_i``), kept on the client's worker.

This module is the loop; :mod:`fedpipe.engine.fed_client` the worker-side tasks,
:mod:`fedpipe.engine.fed_round` one round on the driver, :mod:`fedpipe.engine.fed_state` checks,
checkpoint, resume and summary.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from distributed import Client
from fedpipe import privacy, resilience, runconfig, rundir
from fedpipe.data import snapshot, store
from fedpipe.engine import fed_state, lend, placement, runlog
from fedpipe.engine import fedbuff as async_engine
from fedpipe.engine.fed_client import ClientSpec
from fedpipe.engine.fed_round import (
    Sampling,
    ServerState,
    evaluate,
    evaluate_and_train,
    train_round,
)
from fedpipe.errors import TrainingError, ValidationError
from fedpipe.model import saved as saved_model
from fedpipe.rundir import Run
from fedpipe.tasks import aggregate, fedbuff, sampling
from fedpipe.tasks.aggregate import Stage, Strategy
from fedpipe.tasks.models import Model

log = logging.getLogger("fedpipe")

__all__ = ["ClientSpec", "Run", "Sampling", "ServerState", "federate"]

# How long a task may wait for its client's worker when no --deadline bounds the round.
DEFAULT_NO_WORKER_TIMEOUT = 60.0
RETRIES = 1  # a round short of min_clients is retried this often; the CLI has no option for it
DIVERGE_FACTOR = 1e6  # a global training loss this many times round 0's stops the run
DEFAULT_DELTA = 1e-5
DEFAULT_LR = 0.1  # the default client sgd's step size
DEFAULT_LOCAL_EPOCHS = 1


def federate(store_url: str, model: Model, *, rounds: int, strategy: Strategy | None = None,
             local_epochs: int | None = None, batch_size: int = 32,
             lr: float | Callable[[int], float] | None = None, partition: str | None = None,
             fraction: float | None = None, clients_per_round: int | None = None,
             min_clients: int = 1, deadline: float | None = None, retries: int = RETRIES,
             stages: Sequence[Stage] | None = None, seed: int = 0, test_fraction: float = 0.2,
             eval_every: int = 1, workers: int | None = None, batch_clients: bool = True,
             dask_client: Client | None = None, scheduler: str | None = None,
             out: str | None = None, checkpoint_every: int = 0, resume: bool = False,
             overwrite: bool = False,
             on_record: Callable[[dict], None] | None = None,
             config: Mapping[str, object] | None = None, delta: float | None = None,
             target_epsilon: float | None = None,
             diverge_factor: float | None = DIVERGE_FACTOR,
             mode: fedbuff.Buffered | None = None) -> Run:
    """Federated training of ``model`` on the clients of a partition of a fedpipe store.

    Parameters
    ----------
    store_url : str
        fedpipe zarr store holding the partition.
    model : fedpipe.tasks.models.Model
        The model (built for the store's features and classes).
    rounds : int
        Rounds to run (a resumed run continues up to this number).
    strategy : fedpipe.tasks.aggregate.Strategy, optional
        ``fedavg()`` (default), ``fedprox(mu)``, ``fedavgm``, ``fedadam``, ``fedyogi``,
        ``fedadagrad`` or ``scaffold``; its ``client``, ``local_epochs`` and ``stages``, when
        set, take the place of the keywords below (giving both is refused).
    local_epochs, batch_size, lr
        Client training: local epochs (default 1), batch size, and the step size (default 0.1;
        a float or a schedule evaluated at the round number) of the default client ``sgd``,
        used when the strategy names no ``client`` optimizer.
    partition : str, optional
        Partition name; default the store's only partition.
    fraction, clients_per_round : optional
        Clients sampled per round (a share in (0, 1] or a number); default all.
    min_clients : int
        Fewest accepted updates a round needs; fewer -> retried ``retries`` times, then
        :class:`TrainingError`.
    deadline : float, optional
        Seconds a round waits for its clients; late ones are dropped and logged.
    stages : sequence of Stage, optional
        Aggregation chain (or the strategy's ``stages``); default
        ``(validate(), weighted_mean())``.
    seed, test_fraction
        Run seed (sampling, batch order) and the share of each client's rows held out.
    eval_every : int
        Evaluate on the clients' test rows every this many rounds (and after the last one).
    workers : int, optional
        Simulation workers (default 2) when fedpipe starts its own cluster.
    batch_clients : bool
        One task per worker per round (True) or one per client (False); the same result.
    dask_client, scheduler : optional
        Use this client's cluster, or connect to a scheduler address (no cluster is started).
        Workers that carry ``client-<id>`` resources are discovered; on a cluster whose workers
        carry none (plain ``dask worker``, LocalCluster, ...) the clients are assigned to the
        workers present, balanced by rows, which hold their resources for the run, also across
        a restart by their nanny (:mod:`fedpipe.engine.lend`).
    out : str, optional
        Run directory (``metrics.jsonl``, ``params.npz``, ``summary.json``, checkpoints).
    checkpoint_every : int
        Write ``checkpoint.npz`` every this many rounds (0: only at the end).
    resume : bool
        Continue from ``out/checkpoint.npz``; ends bit-identical to an uninterrupted run.
    overwrite : bool
        ``out`` holds an earlier run that this one replaces once it has finished (without it,
        such an ``out`` is refused; see :func:`fedpipe.rundir.prepare`).
    on_record : callable, optional
        Called with each round's metrics record after it is appended to ``metrics.jsonl``.
    config : mapping, optional
        Resolved options written to ``config.toml`` (the CLI passes its arguments). Without
        it, ``config.toml`` holds the ``fedpipe federate`` options that repeat this call, read
        off the model and strategy (:mod:`fedpipe.runconfig`). Settings no option expresses (a
        model of your own or with an L1 penalty, a schedule function as ``lr``, ``stages``,
        non-default strategy hyperparameters, another ``retries``) are left out and named
        under ``not_repeatable`` with one logged warning; ``fedpipe federate --config`` then
        refuses the file in one line instead of running something else.
    delta, target_epsilon : float, optional
        With a noise stage in ``stages`` (see :mod:`fedpipe.tasks.privacy`): the δ at which ε
        is reported every round (default 1e-5), and a budget: the run stops before the round
        that would spend more than ``target_epsilon`` (never after it); a budget already spent
        is refused before round 0.
    diverge_factor : float, optional
        Stop with :class:`TrainingError` naming the round and its clients when the global
        training loss is non-finite or exceeds this many times the first round's (None: only
        non-finite).
    mode : fedpipe.tasks.fedbuff.Buffered, optional
        ``fp.fedbuff.buffered(...)``: buffered asynchronous training (FedBuff, no rounds;
        ``rounds`` counts model versions), see :mod:`fedpipe.engine.fedbuff`. Default: rounds.

    Returns
    -------
    Run

    References
    ----------
    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 (FederatedAveraging, the loop this runs).
    """
    info = store.read_info(store_url)
    partition = fed_state.resolve_partition(info, partition)
    client_rows = {str(c): int(m["n_rows"])
                   for c, m in info.partitions[partition]["clients"].items()}
    clients = placement.sort_clients(list(client_rows))
    fed_state.check_partition(info, partition, client_rows)
    sampling_ = fed_state.check_sampling(len(clients), fraction, clients_per_round,
                                         min_clients, deadline, retries)
    strategy = strategy or aggregate.fedavg()
    local_epochs, lr, stages = _from_strategy(strategy, local_epochs, lr, stages)
    fed_state.check_positive(rounds=rounds, local_epochs=local_epochs, batch_size=batch_size,
                             eval_every=eval_every)
    if resume and out is None:
        raise ValidationError("--resume needs --out RUN_DIR (the run to continue)")
    chain = tuple(stages) if stages is not None else aggregate.default_chain()
    try:
        aggregate.check_chain(chain)
    except ValueError as exc:
        raise ValidationError(f"stages: {exc}") from None
    if mode is not None:
        _check_async(mode, chain, strategy, lr, fraction, clients_per_round, min_clients,
                     deadline)
    dp = _privacy(chain, len(clients), sampling_, delta, target_epsilon)
    spec = ClientSpec(str(store_url), partition, placement.rows_version(info, partition),
                      float(test_fraction), int(seed), model, int(local_epochs),
                      int(batch_size), lr, strategy.client_transforms, chain,
                      uuid.uuid4().hex[:12], strategy.client)
    round_fn = round_for(chain, len(clients), sampling_)
    run_dir = rundir.prepare(out, resume, overwrite) if out is not None else None
    data = snapshot.pin(str(store_url), run_dir, partition=partition, resume=resume)
    if run_dir is not None:
        rundir.write_config(run_dir, config if config is not None else runconfig.federate_config(
            store_url, model, info, strategy=strategy, stages=stages, lr=lr,
            retries=retries, default_retries=RETRIES, partition=partition, rounds=rounds,
            local_epochs=local_epochs, batch_size=batch_size, fraction=fraction,
            clients_per_round=clients_per_round, min_clients=min_clients, deadline=deadline,
            seed=seed, test_fraction=test_fraction, eval_every=eval_every, out=out,
            checkpoint_every=checkpoint_every, resume=resume,
            # a dask_client given overrides these; the result does not depend on the cluster
            **({} if dask_client is not None else {"workers": workers, "scheduler": scheduler}))
            | _mode_options(mode))
    with (data,  # the store is leased, and checked at both ends
          _cluster(dask_client, scheduler, workers, client_rows, spec.token) as (dc, groups),
          placement.run_scope(dc, spec.token),
          # a silent worker is dropped within ~2 deadlines, an unplaceable task fails
          resilience.bounded(dc, deadline=deadline,
                             no_workers=deadline or DEFAULT_NO_WORKER_TIMEOUT)):
        if mode is None:
            state, history, summary = run_rounds(
                dc, spec, groups, clients, strategy, sampling_,
                _Guards(dp, target_epsilon, diverge_factor), round_fn, rounds=rounds,
                eval_every=eval_every, batch_clients=batch_clients, run_dir=run_dir,
                checkpoint_every=checkpoint_every, on_record=on_record, resume=resume)
        else:
            state, history, summary = async_engine.run_buffered(
                dc, spec, groups, clients, client_rows, strategy, mode, versions=rounds,
                eval_every=eval_every, run_dir=run_dir, checkpoint_every=checkpoint_every,
                on_record=on_record, resume=resume)
    summary[snapshot.KEY] = data.digest
    if run_dir is not None:
        rundir.write_params(run_dir, model.unpack(state.params))
        saved_model.write(run_dir, model, info)  # model.json + preprocess.json: predict needs no store
        rundir.write_summary(run_dir, summary)
        rundir.publish(run_dir)
    return finished_run(model, state, history, summary, run_dir)


def finished_run(model: Model, state: ServerState, history: list[dict], summary: dict,
                 run_dir) -> Run:
    """The :class:`~fedpipe.rundir.Run` a federated run returns (``history`` as its metrics)."""
    path = None if run_dir is None else rundir.target(run_dir)
    return Run(state.params, model.unpack(state.params), history, summary,
               rundir.read_config(path), path, state)


def round_for(chain: Sequence[Stage], n_clients: int, sampling_: Sampling):
    """The round function for ``chain``: secure aggregation's when ``secure_sum`` is in it."""
    if not any(hasattr(stage.before_sum, "secagg") for stage in chain):
        return train_round
    from fedpipe.engine import fed_secagg  # needs the cryptography package: only then

    fed_secagg.prepare(chain, n_clients, sampling_)  # refused here, before round 0
    return fed_secagg.secure_round


def run_rounds(dc: Client, spec: ClientSpec, groups, clients: Sequence[str], strategy: Strategy,
               sampling_: Sampling, guards: _Guards, round_fn, *, rounds: int, eval_every: int,
               batch_clients: bool, run_dir, checkpoint_every: int, on_record,
               resume: bool) -> tuple[ServerState, list[dict], dict]:
    """Rounds from the start or the checkpoint, the final checkpoint, and the run's summary.

    What a simulation (:func:`federate`) and site-local stores (``federate_sites``) share once
    their clients are placed.
    """
    # The groups travel once per run inside the spec; a round's tasks name them by index.
    spec = spec._replace(groups=tuple(tuple(g) for g in groups))
    state = fed_state.initial_state(spec.model, strategy, spec.stages, spec.seed)
    if resume:
        state = fed_state.resume(dc, run_dir, spec, groups, state)
    if guards.dp is not None:
        privacy.check_budget(guards.dp, guards.target_epsilon, state.round)
    state, history, stopped = _loop(dc, spec, groups, clients, state, sampling_, strategy,
                                    rounds, eval_every, batch_clients, run_dir,
                                    checkpoint_every, on_record, guards, round_fn)
    if run_dir is not None:
        fed_state.checkpoint(dc, run_dir, spec, groups, state, strategy)
    summary = fed_state.summary(history, state, strategy, spec, clients, run_dir)
    summary |= _chain_summary(spec.stages, guards.dp, history, state.round, guards.target_epsilon,
                              rounds, stopped)
    if round_fn is not train_round:
        from fedpipe.engine import fed_secagg

        summary["secagg"] = fed_secagg.summary(history)
    return state, history, summary


def _mode_options(mode: fedbuff.Buffered | None) -> dict:
    """The ``fedpipe federate`` options of ``mode`` (none for rounds), for config.toml."""
    return {} if mode is None else {k: v for k, v in mode.spec.items() if v is not None}


def _check_async(mode: fedbuff.Buffered, chain: Sequence[Stage], strategy: Strategy, lr,
                 fraction, clients_per_round, min_clients: int, deadline) -> None:
    """Refuse what ``mode`` (asynchronous, no rounds) does not go with, naming the option."""
    if not isinstance(mode, fedbuff.Buffered):
        raise ValidationError(f"mode must be fp.fedbuff.buffered(...), got {mode!r}")
    async_engine.check_chain(chain, strategy)
    given = [name for name, on in (("--lr-schedule", callable(lr)),
                                   ("--fraction", fraction is not None),
                                   ("--clients-per-round", clients_per_round is not None),
                                   ("--min-clients", min_clients != 1),
                                   ("--deadline", deadline is not None)) if on]
    if given:
        raise ValidationError(f"--mode async does not support {given[0]}: it counts or "
                              "samples rounds, and async training has none (see "
                              "--max-concurrency)")


def _from_strategy(strategy: Strategy, local_epochs: int | None,
                   lr: float | Callable[[int], float] | None, stages: Sequence[Stage] | None):
    """``(local_epochs, lr, stages)``: the strategy's own where it sets them, else the keywords'.

    A setting given both ways is refused rather than one of them silently dropped.
    """
    given = [name for name, mine, kw in (("local_epochs", strategy.local_epochs, local_epochs),
                                         ("stages", strategy.stages, stages),
                                         ("client", strategy.client, lr)) if mine is not None
             and kw is not None]
    if given:
        keyword = {"client": "lr"}.get(given[0], given[0])
        raise ValidationError(f"strategy {strategy.name!r} sets {given[0]}: drop {keyword}= "
                              "(or build the strategy without it)")
    if strategy.local_epochs is not None:
        local_epochs = strategy.local_epochs
    return (DEFAULT_LOCAL_EPOCHS if local_epochs is None else local_epochs,
            DEFAULT_LR if lr is None and strategy.client is None else lr,
            strategy.stages if strategy.stages is not None else stages)


class _Guards(NamedTuple):
    """What may stop a run between rounds: the privacy budget, a diverging loss."""

    dp: privacy.Accountant | None
    target_epsilon: float | None
    diverge_factor: float | None


def _privacy(chain: Sequence[Stage], n_clients: int, sampling_: Sampling, delta: float | None,
             target_epsilon: float | None) -> privacy.Accountant | None:
    noise = privacy.check_chain(chain)
    if noise is None:
        if delta is not None or target_epsilon is not None:
            raise ValidationError("--delta and --target-epsilon need --dp (a noise stage)")
        return None
    delta = DEFAULT_DELTA if delta is None else float(delta)
    if not 0.0 < delta < 1.0 / n_clients:
        raise ValidationError(f"--delta must be in (0, 1/{n_clients} clients), got {delta}")
    if target_epsilon is not None and not target_epsilon > 0:
        raise ValidationError(f"--target-epsilon must be > 0, got {target_epsilon}")
    per_round = sampling.sample_size(n_clients, fraction=sampling_.fraction,
                                     count=sampling_.count)
    return privacy.Accountant(privacy.DpSetup(noise["mode"], noise["noise_multiplier"],
                                              n_clients, per_round, delta))


def _stop_before(guards: _Guards, r: int) -> str | None:
    """Why round ``r`` must not run (its ε would pass the budget), or None."""
    if guards.dp is None or guards.target_epsilon is None:
        return None
    after = guards.dp.epsilon(r + 1)
    if after <= guards.target_epsilon:
        return None
    return (f"privacy budget: round {r} would bring ε to {after:.4g} > --target-epsilon "
            f"{guards.target_epsilon}; stopped after {r} round(s) at ε="
            f"{guards.dp.epsilon(r):.4g}")


def _check_divergence(record: dict, history: list[dict], factor: float | None) -> None:
    loss = record.get("train_loss")
    first = next((h["train_loss"] for h in history if h.get("train_loss") is not None), None)
    blown = (factor is not None and loss is not None and first is not None and first > 0
             and loss > factor * first)
    if loss is not None and (not np.isfinite(loss) or blown):
        clients = sorted(c for c, rec in record["clients"].items() if "rejected" not in rec)
        shown = ", ".join(clients[:10]) + (f" and {len(clients) - 10} more"
                                           if len(clients) > 10 else "")
        why = "is not finite" if not np.isfinite(loss) else f"exceeds {factor:g}x round 0's"
        raise TrainingError(f"round {record['round']}: the global training loss {loss:.4g} "
                            f"{why} (diverged); clients aggregated: {shown}")


def _loop(dc: Client, spec: ClientSpec, groups, clients, state: ServerState,
          sampling_: Sampling, strategy: Strategy, rounds: int, eval_every: int,
          batch_clients: bool, run_dir, checkpoint_every: int,
          on_record, guards: _Guards,
          round_fn=train_round) -> tuple[ServerState, list[dict], str | None]:
    history: list[dict] = []

    def finish(record: dict, evaluation: dict | None) -> None:
        done = record["round"] + 1  # rounds done once this record's round ended
        for client, rec in (evaluation or {}).pop("eval_clients", {}).items():
            record["clients"].setdefault(client, {}).update(rec)
        record.update(evaluation or {})
        if guards.dp is not None:
            record["epsilon"] = guards.dp.epsilon(done)
        record["update_bytes"] = _mean_bytes(record["clients"])
        _check_divergence(record, history, guards.diverge_factor)
        due = checkpoint_every and done % checkpoint_every == 0 and done < rounds
        runlog.emit(run_dir, on_record, record, functools.partial(
            fed_state.checkpoint, dc, run_dir, spec, groups, state, strategy) if due else None)
        # Per-client records go to metrics.jsonl and on_record only: kept here, they grew the
        # driver by ~0.9 MiB a round at 1,000 clients (issue 12).
        history.append(_round_only(record))

    # One trip per evaluated round (issue 18): a round's evaluation rides on the next round's
    # tasks (evaluate_and_train), so its record waits for that round; a checkpoint, the
    # last round, a stop, secure aggregation and per-client tasks evaluate in a trip apart.
    pending = None
    while state.round < rounds:
        r, start = state.round, time.perf_counter()
        if (why := _stop_before(guards, r)) is not None:
            log.warning("%s", why)
            if pending is not None:
                finish(pending, evaluate(dc, spec, groups, state.params, r - 1,
                                         sampling_.deadline))
            return state, history, why
        with _span(f"round-{r}"):
            evaluation = None
            try:
                if pending is not None:
                    state, record, evaluation = evaluate_and_train(
                        dc, spec, groups, clients, state, sampling_, strategy.server,
                        batch_clients)
                else:
                    state, record = round_fn(dc, spec, groups, clients, state, sampling_,
                                             strategy.server, batch_clients)
            except BaseException:
                if pending is not None:  # its record is written, without its evaluation
                    finish(pending, None)
                raise
            due = (r + 1) % eval_every == 0 or r + 1 == rounds
            defer = (due and r + 1 < rounds and round_fn is train_round and batch_clients
                     and not (checkpoint_every and (r + 1) % checkpoint_every == 0))
            if due and not defer:
                own = evaluate(dc, spec, groups, state.params, r, sampling_.deadline)
        record["seconds"] = time.perf_counter() - start
        if pending is not None:
            finish(pending, evaluation)
        pending = record if defer else None
        if not defer:
            finish(record, own if due else None)
    return state, history, None


def _round_only(record: dict) -> dict:
    """A round's record without its per-client records (what the driver keeps in memory)."""
    return {k: v for k, v in record.items() if k != "clients"}


def _mean_bytes(records: dict[str, dict]) -> float | None:
    sizes = [rec["update_bytes"] for rec in records.values() if "update_bytes" in rec]
    return float(np.mean(sizes)) if sizes else None


def _chain_summary(chain: Sequence[Stage], dp: privacy.Accountant | None, history: list[dict],
                   rounds_done: int, target_epsilon: float | None, rounds: int,
                   stopped: str | None) -> dict:
    """The summary's view of the chain: stages, bytes sent per client, ε and the DP event."""
    out: dict = {"stages": [dict(s.spec or {"kind": s.name}) for s in chain],
                 "update_bytes": _mean_bytes({str(i): {"update_bytes": h["update_bytes"]}
                                              for i, h in enumerate(history)
                                              if h.get("update_bytes") is not None})}
    if stopped:
        out["stopped"] = stopped
    if dp is not None:
        noise = privacy.noise_stage_spec(chain)
        weights = next((s.spec.get("weights") for s in chain
                        if s.spec and s.spec.get("kind") == "dp_mean"), None)
        out["privacy"] = {**dp.describe(), "epsilon": dp.epsilon(rounds_done),
                          "target_epsilon": target_epsilon, "planned_rounds": rounds,
                          "weights": weights,
                          "noise_source": "run seed (reproducible simulation)"
                          if noise.get("reproducible") else "OS entropy (secrets)"}
    return out


@contextlib.contextmanager
def _span(name: str) -> Iterator[None]:
    # distributed.span groups a round's tasks on the dashboard; harmless without one.
    from distributed import span

    with span(name):
        yield


@contextlib.contextmanager
def _cluster(dask_client: Client | None, scheduler: str | None, workers: int | None,
             client_rows: dict[str, int], token: str) -> Iterator[tuple[Client, list[list[str]]]]:
    """The cluster to run on and the client groups that share a worker.

    An external cluster's workers either carry ``client-<id>`` resources (a deployment) or are
    lent them for this run (:mod:`fedpipe.engine.lend`).
    """
    if dask_client is not None:
        with lend.placed(dask_client, client_rows, token) as groups:
            yield dask_client, groups
        return
    if scheduler is not None:
        from fedpipe.cluster import connect

        with connect(scheduler=scheduler) as dc, lend.placed(dc, client_rows, token) as groups:
            yield dc, groups
        return
    groups = placement.assign_clients(client_rows, min(workers or 2, len(client_rows)))
    with placement.simulation_cluster(groups) as dc:
        yield dc, placement.discover(dc, list(client_rows))
