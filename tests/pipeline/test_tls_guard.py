"""Only the driver's certificate runs code on a guarded TLS cluster (issue 17).

Real ``dask scheduler`` / ``dask worker --nanny`` processes, each with its own certificate and
``--preload fedpipe.deploy.guard``: the driver trains and may ``Client.run``; a worker's key
(the one most likely to leak: it sits on every client's machine) can neither connect as a
client nor ask the scheduler, a worker or a nanny to run code, but workers still fetch each
other's results.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from distributed import Client, LocalCluster
from distributed.core import rpc
from distributed.protocol.pickle import dumps
from distributed.security import Security
from fedpipe.cli.main import main
from fedpipe.data.ingest import ingest
from fedpipe.deploy import guard, tls
from procs import cluster

GUARD = ("--preload", "fedpipe.deploy.guard")


def _role_args(files: tls.TLSFiles) -> tuple[str, ...]:
    return ("--tls-ca-file", str(files.ca), "--tls-cert", str(files.cert),
            "--tls-key", str(files.key))


def _as_client(files: tls.TLSFiles) -> Security:
    return Security(tls_ca_file=str(files.ca), tls_client_cert=str(files.cert),
                    tls_client_key=str(files.key), require_encryption=True)


@pytest.mark.slow
def test_a_worker_key_cannot_run_code_but_the_driver_can(tmp_path, capsys):
    roles = tls.generate_roles(tmp_path / "tls")
    driver, leaked = roles["client"], roles["worker"]
    store = str(tmp_path / "s.zarr")
    ingest("sklearn:iris", store, progress=False)
    with cluster(tmp_path / "c", nworkers=2,
                 scheduler_args=("--protocol", "tls", *_role_args(roles["scheduler"]), *GUARD),
                 worker_args=(*_role_args(leaked), *GUARD, "--preload-nanny", guard.__name__),
                 client_security=driver.security(),
                 env={"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}) as running:
        code = main(["train", store, "--model", "softmax", "--iterations", "3",
                     "--scheduler", running.address, *_role_args(driver), "-q"])
        assert code == 0, capsys.readouterr().err
        with Client(running.address, security=driver.security(), timeout="30s") as dc:
            assert len(dc.run(os.getpid)) == 2  # the driver may; workers fetch each other's data
            assert dc.submit(sum, dc.map(abs, [-1, -2, -3], pure=False)).result() == 6
            members = dc.scheduler_info(n_workers=-1)["workers"]
            kept = dc.scatter(41, workers=[next(iter(members))])
            with pytest.raises(ImportError, match="register-client.*'fedpipe-worker'"):
                Client(running.address, security=_as_client(leaked), timeout="20s")
            refused = asyncio.run(_attempts(running.address, members, _as_client(leaked),
                                            kept.key))
        assert refused == {"scheduler broadcast": True, "scheduler run_function": True,
                           "scheduler register_worker_plugin": True, "worker run": True,
                           "worker plugin-add": True, "nanny run": True,
                           "worker get_data": False}


async def _attempts(scheduler: str, members: dict, security: Security, key) -> dict[str, bool]:
    """What a holder of the worker's key asks of each member directly: refused or served."""
    args = security.get_connection_args("client")
    function = dumps(os.getpid)
    worker, info = next(iter(members.items()))
    calls = {
        "scheduler broadcast": (scheduler, "broadcast", {"msg": {"op": "run",
                                                                  "function": function}}),
        "scheduler run_function": (scheduler, "run_function", {"function": function}),
        "scheduler register_worker_plugin": (scheduler, "register_worker_plugin",
                                             {"plugin": dumps(object()), "name": "x"}),
        "worker run": (worker, "run", {"function": function}),
        "worker plugin-add": (worker, "plugin-add", {"plugin": dumps(object()), "name": "x"}),
        "nanny run": (info["nanny"], "run", {"function": function}),
        "worker get_data": (worker, "get_data", {"keys": [key]}),
    }
    refused = {}
    for what, (address, op, kwargs) in calls.items():
        async with rpc(address, connection_args=args) as remote:
            try:
                await getattr(remote, op)(**kwargs)
                refused[what] = False
            except guard.Refused as exc:
                assert "'fedpipe-worker'" in str(exc)
                refused[what] = True
    return refused


def test_a_member_without_tls_refuses_everything(caplog):
    # Without certificates there is no name to check: a closed member beats an open one.
    with pytest.raises(Exception, match="is not allowed for certificate None"):
        with LocalCluster(n_workers=0, processes=False, dashboard_address=None,
                          protocol="tcp://", scheduler_kwargs={"preload": [guard.__name__]}):
            pass
    assert "guard needs a TLS cluster" in caplog.text
