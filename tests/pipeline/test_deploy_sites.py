"""Kubernetes manifests for site-local stores: each client's worker mounts its own volume and
is told only its own store; the server group mounts no client data."""

from __future__ import annotations

import pytest
import yaml
from fedpipe.cli.main import main
from fedpipe.deploy import render as deploy
from test_deploy_manifests import validate


def _env(worker: dict) -> dict[str, str]:
    (container,) = worker["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


def test_each_site_worker_mounts_its_own_volume_and_reads_only_its_store():
    cluster, *groups = deploy.render("0,1,site-b", "fedpipe:0.1.0", "ns",
                                     site_store="site.zarr", data_path="/data")
    for resource in (cluster, *groups):
        validate(resource)
    claims = []
    for group, client in zip(groups, ["0", "1", "site-b"], strict=True):
        worker = group["spec"]["worker"]
        assert _env(worker)["FEDPIPE_SITE_STORE"] == "/data/site.zarr"
        (volume,) = worker["spec"]["volumes"]
        claims.append(volume["persistentVolumeClaim"]["claimName"])
        (container,) = worker["spec"]["containers"]
        assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data",
                                              "readOnly": True}]
        assert f"client-{client}=1" in " ".join(container["args"])
    assert claims == ["fedpipe-data-0", "fedpipe-data-1", "fedpipe-data-site-b"]  # one each
    server = cluster["spec"]["worker"]
    assert "volumes" not in server["spec"] and "FEDPIPE_SITE_STORE" not in _env(server)
    # without site stores nothing changes: no site variable anywhere
    plain = deploy.render("0", "fedpipe:0.1.0")
    assert "FEDPIPE_SITE_STORE" not in _env(plain[1]["spec"]["worker"])


@pytest.mark.parametrize("bad", ["/abs/site.zarr", "../other/site.zarr", ""])
def test_a_site_store_outside_the_volume_is_refused_in_one_line(bad, capsys):
    argv = ["deploy", "render", "--clients", "0,1", "--image", "fedpipe:0.1.0",
            "--site-store", bad]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--site-store" in err[0]


def test_render_site_stores_on_the_command_line(capsys):
    assert main(["deploy", "render", "--clients", "0,1", "--image", "fedpipe:0.1.0",
                 "--site-store", "site.zarr"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    envs = [_env(d["spec"]["worker"]) for d in docs if d["kind"] == "DaskWorkerGroup"]
    assert [e["FEDPIPE_SITE_STORE"] for e in envs] == ["/data/site.zarr"] * 2
