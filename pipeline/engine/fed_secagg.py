"""Federated training with secure aggregation: one round of the masking protocol on Dask.

A secure round is four waves of pinned per-worker tasks, each client of a worker running its
own protocol role (its own keys, seeds and shares, kept in the worker's cache, never in a
task result); the messages between clients travel through the driver like updates do::

    secagg-keys-…    advertise: each client draws this round's X25519 key pairs
    secagg-share-…   share keys: Shamir shares of its self-mask seed and mask key, encrypted
                     for each holder (the driver routes ciphertexts it cannot read)
    local-…          train, encode (the chain's secure_sum stage), add the mask; the sum-… tree
                     adds masked uint vectors mod 2^k
    secagg-reveal-…  survivors decrypt their shares and reveal b_u of uploaders, s_u of dropouts

then the driver removes the masks (:func:`fedpipe.tasks.secure.recover`) and runs the chain's
server part and the server optimizer. A round short of the threshold aborts: the model stays
as it was, the record says why, the next round starts with new keys. The protocol math is
:mod:`fedpipe.tasks.secure` and :mod:`fedpipe.tasks.secagg`; this module only moves messages.
"""

from __future__ import annotations

import functools
import logging
import pickle
import secrets
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from distributed import Client
from fedpipe.engine import placement
from fedpipe.engine.fed_client import ClientSpec, _train_client, pack_spec, unpack
from fedpipe.engine.fed_round import Sampling, ServerState, _collect, _Leaves, _short
from fedpipe.errors import ValidationError
from fedpipe.tasks import aggregate, sampling, secagg, secure
from fedpipe.tasks.secure import SecAgg, TooFewSurvivors

log = logging.getLogger("fedpipe")
_SLOT = "secagg"  # worker cache key: (_SLOT, run token, round, client) -> a client's secrets


def prepare(stages: Sequence[aggregate.Stage], n_clients: int, sampling_: Sampling) -> SecAgg:
    """Check before round 0 that the chain's secure stage can run: place, range, threshold."""
    try:
        config = secure.find(stages)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None
    per_round = sampling.sample_size(n_clients, fraction=sampling_.fraction,
                                     count=sampling_.count)
    if per_round > config.clients:
        raise ValidationError(
            f"secure aggregation was set up for sums of at most {config.clients} clients but "
            f"{per_round} are sampled per round: the sum could wrap around 2^{config.bits}")
    if config.threshold >= 1 and config.threshold > per_round:
        raise ValidationError(f"--secagg-threshold {int(config.threshold)} is more than the "
                              f"{per_round} clients sampled per round")
    return config


# --------------------------------------------------------------------------------------------
# worker side: each function runs the step of every client of one worker group


def _mine(token: str, round_: int, client: str) -> dict | None:
    return placement.worker_cache().state.get((_SLOT, token, round_, client))


def _messages(payloads: dict[str, object]) -> dict:
    # Each client's message travels as one pickled blob: a result holding thousands of small
    # bytes objects (100 clients' ciphertexts) took Dask ~1 s to hand over, a blob ~20 ms.
    return aggregate.add_reports(*[aggregate.client_report(c, None, {"msg": pickle.dumps(p)})
                                   for c, p in payloads.items()])


def advertise_group(token: str, clients: Sequence[str], round_: int) -> dict:
    """Fresh key pairs per client for this round; returns the public keys only."""
    cache = placement.worker_cache().state
    for key in [k for k in cache if k[0] == _SLOT and k[1] == token and k[2] < round_]:
        del cache[key]  # an aborted round's secrets: never reused, never kept
    out = {}
    for c in clients:
        keys = secagg.round_keys(secrets.token_bytes(64))
        cache[(_SLOT, token, round_, c)] = {"keys": keys}
        out[c] = (keys.c_public, keys.s_public)
    return _messages(out)


def share_group(token: str, clients: Sequence[str], round_: int, holders: dict, index: dict,
                c_publics: dict, t: int, ctx: bytes) -> dict:
    """Each client's encrypted shares, one per holder; the self-mask seed stays here."""
    out = {}
    for c in clients:
        mine = _mine(token, round_, c)
        if mine is None:  # the worker restarted since advertising: this client dropped out
            continue
        mine["self_seed"], out[c], mine["shared"] = secure.share_keys(c, mine["keys"], holders[c], index,
                                                      c_publics, t, ctx,
                                                      secrets.token_bytes(96))
    return _messages(out)


def secure_train_group(spec, clients: Sequence[str], params, round_: int, stage_states: dict,
                       control, peers: dict, ctx: bytes, bits: int) -> dict:
    """Train, encode (the chain) and mask each client's update; returns their masked sum."""
    spec = unpack(spec)
    return masked_group(spec.token, clients, round_, peers, ctx, bits, functools.partial(
        _train_client, spec, round_=round_, params=params, stage_states=stage_states,
        control=control))


def masked_group(token: str, clients: Sequence[str], round_: int, peers: dict, ctx: bytes,
                 bits: int, report_of: Callable[[str], dict]) -> dict:
    """Each client's encoded report (``report_of(client)``) plus its mask; their masked sum."""
    reports = []
    for c in clients:
        mine = _mine(token, round_, c)
        if mine is None or "self_seed" not in mine:
            reports.append(aggregate.client_report(c, None, {}, "secagg: no round keys here"))
            continue
        report = report_of(c)
        if report["packet"] is not None:
            report["packet"] = secure.mask_packet(report["packet"], c, mine["keys"],
                                                  mine["self_seed"], peers[c], ctx, bits)
        reports.append(report)
    return aggregate.add_reports(*reports)


def reveal_group(token: str, clients: Sequence[str], round_: int, inboxes: dict,
                 c_publics: dict, uploaded: set, dropped: set, ctx: bytes) -> dict:
    """Survivors' shares for unmasking; the round's secrets are forgotten afterwards."""
    cache = placement.worker_cache().state
    out = {}
    for c in clients:
        mine = cache.pop((_SLOT, token, round_, c), None)
        if mine is not None:
            out[c] = secure.reveal(c, mine["keys"], inboxes[c], c_publics, uploaded, dropped,
                                   ctx, mine.get("shared"))
    return _messages(out)


# --------------------------------------------------------------------------------------------
# driver side


def _wave(dc: Client, token: str, groups, members: set[str], name: str, r: int,
          deadline: float | None, task: Callable[[list[str]], Callable]) -> tuple[dict, dict]:
    """One pinned task per worker group with members; (client -> message, dropped clients)."""
    work = [(j, [c for c in g if c in members], g) for j, g in enumerate(groups)]
    calls = {f"{name}-{token}-r{r}-g{j}": (task(mine), placement.pin_group(g))
             for j, mine, g in work if mine}
    owners = [mine for _, mine, _ in work if mine]
    report, dropped = _collect(dc, _Leaves(placement.submit_pinned(dc, calls), owners),
                               deadline, r, name)
    msgs = {c: pickle.loads(rec["msg"])
            for c, rec in (report or {"clients": {}})["clients"].items()}
    return msgs, dropped


def _bytes(payload) -> int:
    if isinstance(payload, bytes):
        return len(payload)
    if isinstance(payload, dict):
        return sum(_bytes(v) for v in payload.values())
    if isinstance(payload, tuple | list):
        return sum(_bytes(v) for v in payload)
    return 0


# the upload wave's task of one worker group: (its clients, their peers' keys, ctx) -> thunk
Upload = Callable[[list[str], dict, bytes], Callable[[], dict]]


class MaskedSum(NamedTuple):
    """What one run of the protocol gave the driver: the unmasked sum of encoded packets
    (None when it aborted, ``aborted`` says why), the clients' records and who dropped."""

    total: dict | None
    records: dict
    rejected: dict
    dropped: dict
    stats: dict
    aborted: str | None = None


def masked_sum(dc: Client, token: str, groups: Sequence[Sequence[str]], sampled: Sequence[str],
               r: int, config: SecAgg, plan: dict[str, str], deadline: float | None,
               min_clients: int, upload: Upload, name: str = "local") -> MaskedSum:
    """Run the protocol once over ``sampled``: keys, shares, masked upload, reveal, unmask.

    ``upload`` makes each group's upload task (model updates in a round, statistics packets
    before round 0); ``plan`` holds the simulated dropouts (client -> phase).
    """
    ctx = secagg.context(token, r)
    dropped: dict[str, str] = {c: f"secagg {p} (simulated)" for c, p in plan.items()}
    stats = {"sampled": len(sampled), "simulated_dropouts": len(plan)}

    def abort(reason: str) -> MaskedSum:
        return MaskedSum(None, {}, {}, dropped, stats | {"aborted": reason}, reason)

    pubs, lost = _wave(dc, token, groups, set(sampled), "secagg-keys", r, deadline,
                       lambda mine: functools.partial(advertise_group, token, mine, r))
    dropped |= lost
    u1 = sorted(pubs)
    graph = secagg.mask_graph(u1, config.graph, ctx)
    t = secure.threshold_for(config, len(graph[u1[0]]) + 1) if u1 else 1
    stats |= {"threshold": t, "degree": len(graph[u1[0]]) if u1 else 0}
    if len(u1) < t or not u1:
        return abort(f"{len(u1)} client(s) advertised keys, fewer than the threshold {t}")
    index = {c: i + 1 for i, c in enumerate(u1)}
    c_pub = {c: p[0] for c, p in pubs.items()}
    s_pub = {c: p[1] for c, p in pubs.items()}
    holders = {c: [c, *graph[c]] for c in u1}
    sealed, lost = _wave(dc, token, groups, set(u1), "secagg-share", r, deadline,
                         lambda mine: functools.partial(
                             share_group, token, mine, r, {c: holders[c] for c in mine},
                             index, {h: c_pub[h] for c in mine for h in holders[c]}, t, ctx))
    dropped |= lost
    u2 = set(sealed)
    if len(u2) < t:
        return abort(f"{len(u2)} client(s) shared keys, fewer than the threshold {t}")
    members = u2 - {c for c, p in plan.items() if p == "upload"}
    report, lost = _upload(dc, token, groups, members, r, graph, u2, s_pub, ctx, deadline,
                           upload, name)
    dropped |= lost
    records = report["clients"] if report else {}
    rejected = {c: rec["rejected"] for c, rec in records.items() if "rejected" in rec}
    u3 = sorted(c for c in records if c not in rejected)
    if len(u3) < max(t, min_clients):
        return abort(f"{len(u3)} masked update(s) arrived, fewer than the threshold {t} "
                     f"or --min-clients {min_clients}")
    gone = sorted(u2 - set(u3))
    answer = set(u3) - {c for c, p in plan.items() if p == "unmask"}
    inbox: dict[str, dict[str, bytes]] = {v: {} for v in answer}
    for u in sorted(u2):  # over the sent ciphertexts, O(n k), not over all pairs
        for v, ciphertext in sealed[u].items():
            if v in inbox:
                inbox[v][u] = ciphertext
    reveals, lost = _wave(dc, token, groups, answer, "secagg-reveal", r, deadline,
                          lambda mine: functools.partial(
                              reveal_group, token, mine, r, {c: inbox[c] for c in mine},
                              {u: c_pub[u] for c in mine for u in inbox[c]}, set(u3),
                              set(gone), ctx))
    dropped |= lost
    started = time.perf_counter()
    try:
        total = secure.recover(report["packet"], reveals, index, t, u3, gone, graph, s_pub,
                               ctx, config.bits)
    except TooFewSurvivors as exc:
        return abort(str(exc))
    stats |= {"masked": len(u3), "dropped": len(sampled) - len(u3), "recovered": len(gone),
              "dropped_after_upload": len(u3) - len(reveals),
              "unmask_seconds": time.perf_counter() - started,
              "bytes_per_client": _bytes_per_client(pubs, sealed, reveals, records)}
    return MaskedSum(total, records, rejected, dropped, stats)


def secure_round(dc: Client, spec: ClientSpec, groups: Sequence[Sequence[str]],
                 clients: Sequence[str], state: ServerState, sampling_: Sampling,
                 server_optimizer, batch_clients: bool = True) -> tuple[ServerState, dict]:
    """One federated round under secure aggregation (same inputs and outputs as train_round)."""
    config = secure.find(spec.stages)
    r = state.round
    sampled = sampling.sample_clients(clients, r, state.seed, fraction=sampling_.fraction,
                                      count=sampling_.count)
    plan = secure.dropout_plan(sampled, r, state.seed, config.dropout, config.dropout_phase)

    def upload(mine: list[str], peers: dict, ctx: bytes) -> Callable[[], dict]:
        return functools.partial(secure_train_group, pack_spec(spec), mine, state.params, r,
                                 state.stage_states, state.control, peers, ctx, config.bits)

    out = masked_sum(dc, spec.token, groups, sampled, r, config, plan, sampling_.deadline,
                     sampling_.min_clients, upload)
    if out.aborted is not None:
        log.warning("round %d aborted, model unchanged: %s", r, out.aborted)
        record = {"round": r, "sampled": len(sampled), "aggregated": 0, "dropped": out.dropped,
                  "rejected": {}, "aggregation": {}, "train_loss": None, "clients": {},
                  "secagg": out.stats}
        return state._replace(round=r + 1), record
    if out.dropped:
        log.warning("round %d: %d client(s) dropped out: %s", r, len(out.dropped),
                    _short(out.dropped))
    return _finish(spec, state, server_optimizer, clients, sampled, out.total, out.records,
                   out.rejected, out.dropped, out.stats)


def _upload(dc: Client, token: str, groups, members: set[str], r: int, graph: dict,
            u2: set[str], s_pub: dict, ctx: bytes, deadline: float | None, upload: Upload,
            name: str):
    calls, owners = {}, []
    for j, g in enumerate(groups):
        mine = [c for c in g if c in members]
        if not mine:
            continue
        peers = {c: {v: s_pub[v] for v in graph[c] if v in u2} for c in mine}
        calls[f"{name}-{token}-r{r}-g{j}"] = (upload(mine, peers, ctx), placement.pin_group(g))
        owners.append(mine)
    return _collect(dc, _Leaves(placement.submit_pinned(dc, calls), owners), deadline, r,
                    "train" if name == "local" else name)


def _bytes_per_client(pubs: dict, sealed: dict, reveals: dict, records: dict) -> float:
    """Mean bytes a client sent this round: keys, encrypted shares, masked update, reveals."""
    sent = [_bytes(pubs.get(c)) + _bytes(sealed.get(c)) + _bytes(reveals.get(c))
            + int(rec.get("update_bytes", 0)) for c, rec in records.items()]
    return sum(sent) / len(sent) if sent else 0.0


def _finish(spec: ClientSpec, state: ServerState, server_optimizer, clients, sampled, total,
            records, rejected, dropped, stats) -> tuple[ServerState, dict]:
    total, stage_states, measurements = aggregate.server_side(spec.stages, state.stage_states,
                                                              total)
    params, opt_state = aggregate.server_step(server_optimizer, state.params, state.opt_state,
                                              total["delta"])
    control = state.control
    if control is not None:  # the clients' control_variates transform reports its changes
        control = aggregate.scaffold_control(control, total["control"], len(clients))
    new_state = ServerState(params, opt_state, stage_states, control, state.round + 1,
                            state.seed)
    accepted = {c: rec for c, rec in records.items() if c not in rejected}
    record = {"round": state.round, "sampled": len(sampled), "aggregated": len(accepted),
              "dropped": dropped, "rejected": rejected, "aggregation": measurements,
              "train_loss": aggregate.weighted_average(accepted, "train_loss"),
              "clients": records, "secagg": stats}
    return new_state, record


def summary(history: Sequence[dict]) -> dict:
    """The run's secure-aggregation totals for ``summary.json``."""
    stats = [rec.get("secagg", {}) for rec in history]
    return {"rounds_aborted": sum("aborted" in s for s in stats),
            **{key: sum(s.get(key, 0) for s in stats)
               for key in ("masked", "dropped", "recovered", "dropped_after_upload")},
            "max_unmask_seconds": max((s.get("unmask_seconds", 0.0) for s in stats), default=0.0)}
