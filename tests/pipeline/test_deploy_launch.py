"""The manifests' container commands, run for real on loopback; the launcher on a stand-in.

The scheduler and worker commands are read from the committed ``deploy/base*/cluster.yaml``
and started as subprocesses exactly as written, with only what Kubernetes would fill in
replaced: ``$(VAR)`` expanded from the container env, the in-cluster Service host by 127.0.0.1,
fixed ports by free ones and the Secret mount path by a temporary directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dask
import pytest
import yaml
from distributed import Client
from fedpipe.cli.main import main
from fedpipe.deploy import kube, tls
from fedpipe.deploy import render as deploy
from fedpipe.engine import placement
from fedpipe.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _localize(text: str, env: dict[str, str], port: int, tls_dir: Path | None) -> str:
    for key, value in env.items():
        text = text.replace(f"$({key})", value)
    text = text.replace("fedpipe-scheduler:8786", f"127.0.0.1:{port}")
    if tls_dir is not None:
        text = text.replace(deploy.TLS_MOUNT, str(tls_dir))
    return text


def _command(container: dict[str, Any], port: int, tls_dir: Path | None,
             worker_name: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The container's args and env as a local process would need them."""
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    if worker_name:
        env["DASK_WORKER_NAME"] = worker_name  # what the operator injects
    env = {k: _localize(v, env, port, tls_dir) for k, v in env.items()}
    args = [_localize(a, env, port, tls_dir) for a in container["args"]]
    replace = {"--host": "127.0.0.1", "--port": str(port), "--dashboard-address": "127.0.0.1:0"}
    for i, arg in enumerate(args[:-1]):
        if arg in replace:
            args[i + 1] = replace[arg]
    assert args[0] == "dask", args  # `dask scheduler` / `dask worker`, never dask-worker
    args[0] = str(Path(sys.executable).with_name("dask"))
    return args, env


def _start_manifest_cluster(base: str, files: tls.TLSFiles | None, clients: tuple[str, ...],
                            server: bool):
    """Start the scheduler, (the server worker) and the given client workers of ``deploy/<base>``.

    Returns once every worker has registered, with the address and the processes.
    """
    cluster, *groups = yaml.safe_load_all((DEPLOY / base / deploy.MANIFEST).read_text())
    tls_dir = files.ca.parent if files else None
    port = _free_port()
    containers = [(cluster["spec"]["scheduler"]["spec"]["containers"][0], None)]
    if server:
        containers.append((cluster["spec"]["worker"]["spec"]["containers"][0], "server-worker"))
    by_client = {g["spec"]["worker"]["metadata"]["labels"][deploy.CLIENT_LABEL]: g for g in groups}
    for client_id in clients:
        group = by_client[client_id]
        containers.append((group["spec"]["worker"]["spec"]["containers"][0],
                           f"{group['metadata']['name']}-worker-0"))
    base_env = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                             "MKL_NUM_THREADS": "1"}
    address = f"{'tls' if files else 'tcp'}://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        for container, worker_name in containers:
            args, env = _command(container, port, tls_dir, worker_name)
            procs.append(subprocess.Popen(args, env=base_env | env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            if worker_name is None:
                _wait_for_port(port, procs[0])
        security = files.security() if files else None
        with Client(address, security=security, timeout="30s") as dask_client:
            dask_client.wait_for_workers(len(containers) - 1, timeout=90)
    except BaseException:
        _stop(procs)
        raise
    return address, procs


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    stop = time.monotonic() + timeout
    while time.monotonic() < stop:
        assert proc.poll() is None, "the scheduler command exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"scheduler did not listen on {port}")


def _stop(procs: list[subprocess.Popen]) -> None:
    # Workers first (their nannies close the worker processes they started), scheduler last.
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="class")
def tcp_cluster():
    address, procs = _start_manifest_cluster("base", None, ("0",), server=True)
    try:
        yield address
    finally:
        _stop(procs)


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory) -> tls.TLSFiles:
    return tls.generate(tmp_path_factory.mktemp("tls"), hosts=["localhost", "127.0.0.1"])


@pytest.fixture(scope="class")
def tls_cluster(tls_material):
    address, procs = _start_manifest_cluster("base-tls", tls_material, ("0", "1"),
                                             server=False)
    try:
        yield address
    finally:
        _stop(procs)


def _tls_config(files: tls.TLSFiles) -> dict[str, Any]:
    """What a driver sets (as DASK_DISTRIBUTED__COMM__... env) to reach a TLS cluster."""
    return {
        "distributed.comm.require-encryption": True,
        "distributed.comm.tls.ca-file": str(files.ca),
        "distributed.comm.tls.client.cert": str(files.cert),
        "distributed.comm.tls.client.key": str(files.key),
    }


def _workers_by_name(dask_client: Client, expected: int) -> dict[str, dict[str, Any]]:
    dask_client.wait_for_workers(expected, timeout=60)
    workers = dask_client.scheduler_info(n_workers=-1)["workers"]
    return {w["name"]: w | {"address": a} for a, w in workers.items()}


# The processes started from the manifests cannot import this test module, and distributed
# pickles importable functions by reference: hand them functions defined in a local scope,
# which cloudpickle ships by value.
def _remote_helpers():
    def worker_name() -> str:
        from distributed import get_worker

        return get_worker().name

    def cached_clients(dask_worker) -> list[str]:
        cache = dask_worker.plugins.get("fedpipe-client-cache")
        return sorted({key[2] for key in cache.rows}) if cache is not None else []

    def reads(dask_worker) -> int:
        cache = dask_worker.plugins.get("fedpipe-client-cache")
        return cache.reads if cache is not None else 0

    return worker_name, cached_clients, reads


_worker_name, _cached_clients, _reads = _remote_helpers()


class TestPlainCommands:
    """``deploy/base``: scheduler, server worker and client 0's worker, plain tcp."""

    def test_they_register_with_their_resources_and_pin(self, tcp_cluster):
        with Client(tcp_cluster, timeout="20s") as dask_client:
            workers = _workers_by_name(dask_client, 2)
            assert workers["server-worker"]["resources"] == {"server": 1}
            name = "fedpipe-client-0-worker-0"
            assert workers[name]["resources"] == {"client-0": 1}
            future = dask_client.submit(_worker_name, resources={"client-0": 1}, pure=False)
            assert future.result(timeout=30) == name


class TestTLSCommands:
    """``deploy/base-tls``: scheduler and the workers of clients 0 and 1, TLS only."""

    def test_plain_tcp_is_refused(self, tls_cluster):
        with pytest.raises((OSError, TimeoutError)):
            Client(tls_cluster.replace("tls://", "tcp://"), timeout="2s")

    def test_federate_pins_clients_and_retirement_moves_no_rows(
        self, tls_cluster, tls_material, small_store, tmp_path, monkeypatch
    ):
        # `--kubernetes NS/NAME` as a user types it; the Service lookup (kr8s, a live API
        # server) answers what dask-kubernetes would: a tcp:// address of the Service.
        lookups = []

        def service_address(service: str, namespace: str | None) -> str:
            lookups.append((service, namespace))
            return tls_cluster.replace("tls://", "tcp://")

        monkeypatch.setattr(kube, "_service_address", service_address)
        store_url = small_store()
        out = tmp_path / "run"
        argv = ["federate", store_url, "--clients", "2", "--model", "softmax", "--rounds", "2",
                "--kubernetes", "fedpipe-test/fedpipe", "--out", str(out), "-q"]
        with dask.config.set(_tls_config(tls_material)):
            assert main(argv) == 0  # tls:// chosen because a CA is configured
            assert lookups == [("fedpipe-scheduler", "fedpipe-test")]
            assert (out / "summary.json").is_file()
            with Client(tls_cluster, timeout="20s") as dask_client:
                workers = _workers_by_name(dask_client, 2)
                assert all(w["address"].startswith("tls://") for w in workers.values())
                reads = dask_client.run(_reads)
                # Each worker read one client's rows (its own: tasks are pinned by client-<id>),
                # and the run freed them when it ended.
                assert {name: reads[w["address"]] for name, w in workers.items()} == {
                    "fedpipe-client-0-worker-0": 1, "fedpipe-client-1-worker-0": 1}
                assert all(not c for c in dask_client.run(_cached_clients).values())
                # Rows cached on client 0's worker by a pinned task, as during a run ...
                partition = json.loads((out / "summary.json").read_text())["partition"]
                dask_client.submit(placement.client_rows, store_url, partition, "0",
                                   test_fraction=0.2, seed=0, pure=False,
                                   resources={"client-0": 1}).result(timeout=30)
                cached = dask_client.run(_cached_clients)
                by_name = {name: cached[w["address"]] for name, w in workers.items()}
                assert by_name == {"fedpipe-client-0-worker-0": ["0"],
                                   "fedpipe-client-1-worker-0": []}
                # ... and what a Kubernetes scale-down does: retire gracefully. The rows sit
                # outside the scheduler's view, so none of client 0's reach the remaining worker.
                dask_client.retire_workers([workers["fedpipe-client-0-worker-0"]["address"]],
                                           close_workers=False)
                cached = dask_client.run(_cached_clients)
                assert all("0" not in clients for clients in cached.values())


def test_tls_only_local_cluster_and_plain_client_refused(tls_material):
    from distributed import LocalCluster

    security = tls_material.security()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls",
                      security=security, dashboard_address=":0") as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        with Client(cluster, security=security) as dask_client:
            assert dask_client.submit(sum, [1, 2]).result(timeout=30) == 3
        with pytest.raises((OSError, TimeoutError)):
            Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout="2s")


# --- the launcher, against a stand-in for KubeCluster ----------------------------------------


class RecordingKubeCluster:
    """Records what ``up`` hands to ``dask_kubernetes.operator.KubeCluster``."""

    instances: list[RecordingKubeCluster] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.groups: list[dict[str, Any]] = []
        self.adapted: tuple[int, int] | None = None
        self.scheduler_address = "tcp://fedpipe-scheduler.ns:8786"
        RecordingKubeCluster.instances.append(self)

    def add_worker_group(self, **kwargs: Any) -> None:
        self.groups.append(kwargs)

    def adapt(self, minimum: int, maximum: int) -> None:
        self.adapted = (minimum, maximum)


def test_up_passes_our_specs_one_group_per_client():
    cluster = kube.up("0,1", "fedpipe:0.1.0", "ns", cluster_class=RecordingKubeCluster)
    spec = cluster.kwargs["custom_cluster_spec"]
    assert spec == deploy.render("0,1", "fedpipe:0.1.0", "ns")[0]
    assert cluster.kwargs["namespace"] == "ns"
    assert cluster.kwargs["shutdown_on_close"] is False
    assert [g["name"] for g in cluster.groups] == ["client-0", "client-1"]
    for client_id, group in zip("01", cluster.groups, strict=True):
        args = group["custom_spec"]["spec"]["containers"][0]["args"]
        assert args[:2] == ["dask", "worker"]
        assert args[args.index("--resources") + 1] == f"client-{client_id}=1"
        assert group["n_workers"] == 1
    assert cluster.adapted is None


def test_up_autoscales_only_without_client_groups():
    with pytest.raises(ConfigError, match="never autoscaled"):
        kube.up("0", "fedpipe:0.1.0", adapt=(1, 4), cluster_class=RecordingKubeCluster)
    cluster = kube.up("", "fedpipe:0.1.0", adapt=(1, 4), cluster_class=RecordingKubeCluster)
    assert cluster.adapted == (1, 4) and cluster.groups == []


def test_up_refuses_tls_with_a_pointer_to_render():
    with pytest.raises(ConfigError, match="render --tls"):
        kube.up("0", "fedpipe:0.1.0", tls_secret="fedpipe-tls",
                cluster_class=RecordingKubeCluster)


def test_kubernetes_name_resolves_through_the_scheduler_service():
    calls = []

    def lookup(service: str, namespace: str | None) -> str:
        calls.append((service, namespace))
        return f"tcp://{service}.{namespace}:8786"

    assert kube.resolve_kubernetes("prod/fedpipe", lookup=lookup) == (
        "tcp://fedpipe-scheduler.prod:8786")
    assert calls == [("fedpipe-scheduler", "prod")]
    assert kube.resolve_kubernetes("fedpipe", lookup=lookup).startswith("tcp://")
    with dask.config.set({"distributed.comm.tls.ca-file": "ca.crt"}):
        assert kube.resolve_kubernetes("fedpipe", lookup=lookup).startswith("tls://")
    with pytest.raises(ConfigError, match="'Bad/x/y'"):
        kube.resolve_kubernetes("Bad/x/y", lookup=lookup)


def test_cli_up_uses_kubecluster_and_reports_the_address(monkeypatch, capsys):
    import json

    operator = pytest.importorskip("dask_kubernetes.operator")
    monkeypatch.setattr(operator, "KubeCluster", RecordingKubeCluster)
    argv = ["deploy", "up", "--clients", "a,b", "--image", "fedpipe:0.1.0", "--namespace", "ns",
            "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["scheduler_address"] == "tcp://fedpipe-scheduler.ns:8786"
    assert summary["groups"] == ["fedpipe-client-a", "fedpipe-client-b"]
    assert [g["name"] for g in RecordingKubeCluster.instances[-1].groups] == ["client-a",
                                                                              "client-b"]
    assert main(argv[:-1] + ["--adapt", "1,3", "-q"]) == 2
    assert "never autoscaled" in capsys.readouterr().err


def test_scheduler_or_kubernetes_but_not_both(monkeypatch):
    monkeypatch.setattr(kube, "_service_address", lambda s, ns: f"tcp://{s}.{ns}:8786")
    assert kube.cluster_address(None, None) is None
    assert kube.cluster_address("tcp://h:1", None) == "tcp://h:1"
    assert kube.cluster_address(None, "ns/fp") == "tcp://fp-scheduler.ns:8786"
    with pytest.raises(ConfigError, match="give one"):
        kube.cluster_address("tcp://h:1", "ns/fp")


@pytest.mark.parametrize("length", [["train", "--iterations", "1"], ["federate", "--rounds", "1"]])
def test_kubernetes_flag_is_wired_into_train_and_federate(length, small_store, capsys):
    command, *options = length
    argv = [command, small_store(), "--model", "softmax", *options,
            "--scheduler", "tcp://127.0.0.1:1", "--kubernetes", "ns/fedpipe"]
    assert main(argv) == 2
    assert "--kubernetes ns/fedpipe: give one" in capsys.readouterr().err
