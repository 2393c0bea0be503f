"""A real TLS cluster on loopback with one certificate per role (scheduler, worker, driver).

``fedpipe train --tls-*`` runs on it with the driver's own certificate; a client presenting no
certificate of the cluster's CA is refused by the scheduler.
"""

from __future__ import annotations

import socket
import ssl

import pytest
from distributed import Client
from distributed.security import Security
from fedpipe.cli.main import main
from fedpipe.data.ingest import ingest
from fedpipe.deploy import tls
from procs import cluster


def _role_args(files: tls.TLSFiles) -> tuple[str, ...]:
    return ("--tls-ca-file", str(files.ca), "--tls-cert", str(files.cert),
            "--tls-key", str(files.key))


@pytest.mark.slow
def test_train_on_a_tls_cluster_with_per_role_certificates(tmp_path, capsys):
    roles = tls.generate_roles(tmp_path / "tls")
    assert len({f.cert.read_bytes() for f in roles.values()}) == 3  # distinct per role
    store = str(tmp_path / "s.zarr")
    ingest("sklearn:iris", store, progress=False)
    driver = roles["client"]
    with cluster(tmp_path / "c", nworkers=1,
                 scheduler_args=("--protocol", "tls", *_role_args(roles["scheduler"])),
                 worker_args=_role_args(roles["worker"]),
                 client_security=driver.security(),
                 env={"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}) as running:
        assert running.address.startswith("tls://")
        code = main(["train", store, "--model", "softmax", "--iterations", "3",
                     "--scheduler", running.address, *_role_args(driver), "-q"])
        assert code == 0, capsys.readouterr().err
        # A client certificate from another CA (anyone can make one) is refused...
        foreign = tls.generate_roles(tmp_path / "foreign", roles=("client",))["client"]
        stranger = Security(tls_ca_file=str(driver.ca), tls_client_cert=str(foreign.cert),
                            tls_client_key=str(foreign.key), require_encryption=True)
        with pytest.raises((OSError, TimeoutError)):
            Client(running.address, security=stranger, timeout="5s")
        # ... and so is a plain TLS client with no certificate at all.
        context = ssl.create_default_context(cafile=str(driver.ca))
        context.check_hostname = False
        host, port = running.address.removeprefix("tls://").rsplit(":", 1)
        with pytest.raises((ssl.SSLError, OSError)):
            with socket.create_connection((host, int(port)), 5) as raw, \
                    context.wrap_socket(raw) as conn:
                conn.recv(8)  # TLS 1.3: the server's refusal arrives with the first read
        capsys.readouterr()
        assert main(["train", store, "--model", "softmax", "--iterations", "3",
                     "--scheduler", running.address, "-q"]) == 2  # tls:// with no flags
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_tls_flags_are_all_or_none_and_need_a_scheduler(tmp_path, capsys):
    roles = tls.generate_roles(tmp_path / "tls", roles=("client",))
    store = str(tmp_path / "s.zarr")
    ingest("sklearn:iris", store, progress=False)
    base = ["train", store, "--model", "softmax", "--iterations", "1", "-q"]
    assert main([*base, "--tls-cert", str(roles["client"].cert)]) == 2
    assert "missing --tls-ca-file, --tls-key" in capsys.readouterr().err
    assert main([*base, *_role_args(roles["client"])]) == 2
    assert "need --scheduler" in capsys.readouterr().err
