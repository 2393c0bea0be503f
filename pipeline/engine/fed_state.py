"""Federated training, run bookkeeping: checks, initial state, checkpoint and resume, summary.

A checkpoint is the driver's :class:`fedpipe.engine.fed_round.ServerState` plus the per-client state
fetched from the clients' workers; resuming puts both back, so a resumed run ends bit-identical
to an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from distributed import Client
from fedpipe.data import store
from fedpipe.engine import placement, runlog
from fedpipe.engine.fed_client import ClientSpec, get_client_state, put_client_state
from fedpipe.engine.fed_round import Sampling, ServerState
from fedpipe.errors import ValidationError
from fedpipe.tasks import aggregate, sampling
from fedpipe.tasks.aggregate import Stage, Strategy
from fedpipe.tasks.models import Model

log = logging.getLogger("fedpipe")


def initial_state(model: Model, strategy: Strategy, stages: Sequence[Stage],
                   seed: int) -> ServerState:
    """Round-0 state: the model's initial params, fresh optimizer and stage states."""
    params = model.init(seed)
    control = (np.zeros_like(params) if aggregate.server_control(strategy.client_transforms)
               else None)
    return ServerState(params, strategy.server.init(params),
                       aggregate.init_states(stages, model.n_params), control, 0, int(seed))


def checkpoint(dc: Client, run_dir, spec: ClientSpec, groups, state: ServerState,
                strategy: Strategy) -> None:
    """Write ``checkpoint.npz``: server state plus the per-client state on workers."""
    extra = {f"stage/{name}/{k}": v for name, st in state.stage_states.items()
             for k, v in st.items()}
    if state.control is not None:
        extra["control"] = state.control
    # per-client state on the workers: SCAFFOLD's c_i, top-k's error-feedback residual
    for client, st in _fetch_client_state(dc, spec, groups).items():
        extra |= {f"client/{client}/{k}": v for k, v in st.items()}
    meta = {"round": state.round, "seed": state.seed, "strategy": strategy.name,
            "partition": spec.partition}
    runlog.save_state(run_dir, state.params, state.opt_state, meta, extra)


def _fetch_client_state(dc: Client, spec: ClientSpec, groups) -> dict:
    futures = [dc.submit(get_client_state, spec.token, g, key=f"state-{spec.token}-get-g{j}",
                         resources=placement.pin_group(g), pure=False)
               for j, g in enumerate(groups)]
    merged: dict = {}
    for part in dc.gather(futures):
        merged.update(part)
    return merged


def resume(dc: Client, run_dir, spec: ClientSpec, groups, fresh: ServerState) -> ServerState:
    """The checkpoint's server state, with per-client state put back on the workers."""
    loaded = runlog.load_state(run_dir)
    if loaded is None:
        raise ValidationError(f"--resume: no checkpoint.npz in {run_dir}")
    params, opt_state, arrays, meta = loaded
    if meta.get("partition") != spec.partition or int(meta["n_params"]) != fresh.params.size:
        raise ValidationError(f"--resume: checkpoint in {run_dir} is for partition "
                              f"{meta.get('partition')!r} with {meta['n_params']} params")
    if set(opt_state) != set(fresh.opt_state):  # another server optimizer: its state won't fit
        raise ValidationError(f"--resume: checkpoint in {run_dir} holds server-optimizer state "
                              f"{sorted(opt_state)}, this strategy keeps {sorted(fresh.opt_state)}"
                              ": resume with the run's --strategy")
    stage_states = {name: {k.split("/", 2)[2]: v for k, v in arrays.items()
                           if k.startswith(f"stage/{name}/")} for name in fresh.stage_states}
    per_client: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        if key.startswith("client/"):
            _, client, name = key.split("/", 2)
            per_client.setdefault(client, {})[name] = value
    futures = [dc.submit(put_client_state, spec.token, {c: per_client[c] for c in g
                                                        if c in per_client},
                         key=f"state-{spec.token}-put-g{j}",
                         resources=placement.pin_group(g), pure=False)
               for j, g in enumerate(groups)]
    dc.gather(futures)
    runlog.rewind(run_dir, "round", int(meta["round"]))
    log.info("resuming at round %d from %s", meta["round"], run_dir)
    return ServerState(params, opt_state, stage_states, arrays.get("control"),
                       int(meta["round"]), int(meta["seed"]))


def resolve_partition(info: store.StoreInfo, partition: str | None) -> str:
    """The partition to train on: the one named, or the store's only one."""
    names = sorted(info.partitions)
    if partition is None:
        if len(names) != 1:
            raise ValidationError(
                f"store {info.url} has {len(names)} partitions ({', '.join(names) or 'none'}): "
                "name one, or give --clients K --scheme S to make one")
        return names[0]
    if partition not in info.partitions:
        raise ValidationError(f"store {info.url} has no partition {partition!r} "
                              f"(has {', '.join(names) or 'none'})")
    return partition


def check_partition(info: store.StoreInfo, partition: str, client_rows: dict[str, int]) -> None:
    """Fail unless the partition has clients and covers exactly the store's rows."""
    if not client_rows:
        raise ValidationError(f"partition {partition!r} of {info.url} has no clients")
    total = sum(client_rows.values())
    if total != info.n_rows:
        raise ValidationError(f"partition {partition!r} has {total} rows but store {info.url} "
                              f"has {info.n_rows}: it was made for another version of the store")


def check_sampling(n_clients: int, fraction: float | None, count: int | None,
                    min_clients: int, deadline: float | None, retries: int) -> Sampling:
    """Validate the per-round sampling options (one-line ValidationError)."""
    if fraction is not None and count is not None:
        raise ValidationError("give --fraction or --clients-per-round, not both")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValidationError(f"--fraction must be in (0, 1], got {fraction}")
    if count is not None and count < 1:
        raise ValidationError(f"--clients-per-round must be at least 1, got {count}")
    if deadline is not None and deadline <= 0:
        raise ValidationError(f"--deadline must be > 0 seconds, got {deadline}")
    if retries < 0:
        raise ValidationError(f"retries must be >= 0, got {retries}")
    per_round = sampling.sample_size(n_clients, fraction=fraction, count=count)
    if not 1 <= min_clients <= per_round:
        raise ValidationError(f"--min-clients {min_clients} must be between 1 and the "
                              f"{per_round} clients sampled per round")
    return Sampling(fraction, count, int(min_clients), deadline, int(retries))


def check_positive(**values: int) -> None:
    """Fail with the CLI option's name unless every value is at least 1."""
    for name, value in values.items():
        if value < 1:
            raise ValidationError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def summary(history: list[dict], state: ServerState, strategy: Strategy, spec: ClientSpec,
             clients: Sequence[str], run_dir) -> dict:
    """The run's ``summary.json``: counts, median seconds per round, last test metrics."""
    last = history[-1] if history else {}
    summary = {"command": "federate", "strategy": strategy.name, "partition": spec.partition,
               "clients": len(clients), "rounds": state.round, "rounds_run": len(history),
               **runlog.timing(history, "round"),
               "dropped": sum(len(rec.get("dropped", {})) for rec in history),
               "rejected": sum(len(rec.get("rejected", {})) for rec in history),
               "n_params": int(state.params.size)}
    summary |= {k: v for k, v in last.items() if k.startswith("test_") or k == "train_loss"}
    return summary | runlog.where(run_dir)
