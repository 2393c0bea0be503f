"""Rendered Kubernetes manifests: CRD schemas, kustomize overlays, committed files, CLI imports.

Everything here runs without Docker or a cluster: the schemas are the resolved CRDs that ship
inside the installed dask-kubernetes package (its Helm chart's ``crds/``), made strict, and the
overlays are rendered offline with ``kubectl kustomize``.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from fedpipe.cli.main import main
from fedpipe.deploy import render as deploy
from fedpipe.errors import ConfigError, ValidationError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD_KINDS = {"DaskCluster": "daskcluster.yaml", "DaskWorkerGroup": "daskworkergroup.yaml"}
OVERLAYS = {"dev": ("fedpipe-dev", "fedpipe:0.1.0", False),
            "prod": ("fedpipe-prod", "registry.example.com/fedpipe:0.1.0", True)}


def _crd_dir() -> Path:
    dask_kubernetes = pytest.importorskip("dask_kubernetes")
    package = Path(dask_kubernetes.__file__).parent
    found = sorted(package.glob("operator/deployment/helm/*/crds"))
    assert found, "dask-kubernetes ships no resolved CRDs under its Helm chart"
    return found[0]


def _strict(schema: Any) -> Any:
    """Reject unknown fields wherever the CRD lists properties but says nothing of others."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(item) for item in schema]
    return schema


@functools.cache
def _validator(kind: str, strict: bool) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_schema(kind, strict))


def _schema(kind: str, strict: bool = True) -> dict[str, Any]:
    # CSafeLoader: the resolved CRDs are hundreds of kilobytes.
    text = (_crd_dir() / CRD_KINDS[kind]).read_text()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])
    # The API server checks apiVersion/kind/metadata itself; spell that part out for the validator.
    label_map = {"type": "object", "additionalProperties": {"type": "string"}}
    schema["properties"] |= {
        "apiVersion": {"const": deploy.API_VERSION},
        "kind": {"const": kind},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                           "namespace": {"type": "string"},
                           "labels": label_map, "annotations": label_map},
        },
    }
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return _strict(schema) if strict else schema


def _prune(value: Any) -> Any:
    """Drop nulls, as the API server does before validating."""
    if isinstance(value, dict):
        return {k: _prune(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def validate(resource: dict[str, Any], strict: bool = True) -> None:
    error = jsonschema.exceptions.best_match(
        _validator(resource["kind"], strict).iter_errors(_prune(resource)))
    if error is not None:
        raise error


def _dask_resources(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in CRD_KINDS]


def _containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    spec = resource["spec"]
    pods = [spec["worker"]["spec"]] + ([spec["scheduler"]["spec"]] if "scheduler" in spec else [])
    return [c for pod in pods for c in pod["containers"]]


# --- CRD schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("tls_secret", [None, "fedpipe-tls"])
def test_every_rendered_resource_validates_strictly(tls_secret):
    resources = deploy.render(
        "0,1,site-b", "fedpipe:0.1.0", "ns", tls_secret=tls_secret, node_label="fedpipe/site",
        taint_key="fedpipe/site",
        placement={"1": deploy.Placement(volume={"hostPath": {"path": "/srv/zarr"}})},
    )
    assert [r["kind"] for r in resources] == ["DaskCluster"] + ["DaskWorkerGroup"] * 3
    for resource in resources:
        validate(resource)


def test_operator_defaults_validate_only_after_pruning_nulls():
    # dask-kubernetes' own generator leaves env/resources as None: the API server prunes them.
    from dask_kubernetes.operator import make_cluster_spec

    spec = make_cluster_spec(name="plain", image="fedpipe:0.1.0", n_workers=1)
    validate(spec)
    assert not _validator("DaskCluster", True).is_valid(spec)


def _mutations():
    """(description, mutate) pairs that each must make a valid resource invalid."""

    def container(r):
        return r["spec"]["worker"]["spec"]["containers"][0]

    return [
        ("unknown container field", lambda r: container(r).update(argz=["dask"])),
        ("unknown spec field", lambda r: r["spec"].update(autoscale=True)),
        ("replicas as a string", lambda r: r["spec"]["worker"].update(replicas="1")),
        ("containerPort as a string",
         lambda r: container(r)["ports"][0].update(containerPort="8788")),
        ("label value not a string",
         lambda r: r["spec"]["worker"]["metadata"]["labels"].update({"fedpipe/client": 0})),
        ("worker group without its cluster", lambda r: r["spec"].pop("cluster")),
        ("wrong apiVersion", lambda r: r.update(apiVersion="kubernetes.dask.org/v2")),
        ("env entry with a number", lambda r: container(r)["env"].append({"name": "X", "value": 1})),
    ]


@pytest.mark.parametrize("description,mutate", _mutations(), ids=[m[0] for m in _mutations()])
def test_validator_bites(description, mutate):
    group = deploy.render("0", "fedpipe:0.1.0")[1]
    validate(group)
    broken = copy.deepcopy(group)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_strict_mode_is_what_catches_unknown_fields():
    group = deploy.render("0", "fedpipe:0.1.0")[1]
    group["spec"]["worker"]["spec"]["containers"][0]["argz"] = ["dask"]
    validate(group, strict=False)  # the CRD as shipped would let a typo through
    with pytest.raises(jsonschema.ValidationError, match="argz"):
        validate(group)


# --- content of the rendered resources --------------------------------------------------------


def test_one_group_per_client_pinned_by_resource_never_by_address():
    cluster, *groups = deploy.render("0,1,2", "fedpipe:0.1.0")
    assert [g["metadata"]["name"] for g in groups] == [f"fedpipe-client-{i}" for i in "012"]
    for client_id, group in zip("012", groups, strict=True):
        worker = group["spec"]["worker"]
        (container,) = worker["spec"]["containers"]
        args = container["args"]
        assert group["spec"]["cluster"] == cluster["metadata"]["name"]
        assert worker["replicas"] == 1
        assert worker["metadata"]["labels"][deploy.CLIENT_LABEL] == client_id
        assert group["metadata"]["labels"][deploy.CLIENT_LABEL] == client_id
        assert args[:2] == ["dask", "worker"] and "dask-worker" not in args
        assert args[args.index("--resources") + 1] == f"client-{client_id}=1"
        claim = worker["spec"]["volumes"][0]["persistentVolumeClaim"]
        assert claim == {"claimName": f"fedpipe-data-{client_id}", "readOnly": True}
    scheduler_args = cluster["spec"]["scheduler"]["spec"]["containers"][0]["args"]
    assert scheduler_args[:2] == ["dask", "scheduler"]
    assert not any(d["kind"] == "DaskAutoscaler" for d in [cluster, *groups])


def test_placement_reaches_the_pod_spec():
    toleration = {"key": "site", "operator": "Exists", "effect": "NoSchedule"}
    volume = {"persistentVolumeClaim": {"claimName": "hospital-a-zarr"}}
    _, group = deploy.render(
        ["a"], "fedpipe:0.1.0",
        placement={"a": deploy.Placement({"zone": "eu-1"}, (toleration,), volume)},
        node_label="fedpipe/site",
    )
    pod = group["spec"]["worker"]["spec"]
    assert pod["nodeSelector"] == {"zone": "eu-1", "fedpipe/site": "a"}
    assert pod["tolerations"] == [toleration]
    assert pod["volumes"] == [{"name": "data", **volume}]
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/data"


@pytest.mark.parametrize(
    "kwargs,error,culprit",
    [
        ({"clients": "0,Bad"}, ValidationError, "'Bad'"),
        ({"clients": "0,0"}, ValidationError, "'0'"),
        ({"clients": "0", "image": "fedpipe"}, ConfigError, "'fedpipe'"),
        ({"clients": "0", "image": "fedpipe:latest"}, ConfigError, "'fedpipe:latest'"),
        ({"clients": "0", "name": "Fed_pipe"}, ValidationError, "'Fed_pipe'"),
        ({"clients": "0", "namespace": "Prod"}, ValidationError, "'Prod'"),
        ({"clients": "0", "placement": {"9": deploy.Placement()}}, ValidationError, "'9'"),
    ],
)
def test_bad_input_names_the_culprit_in_one_line(kwargs, error, culprit):
    kwargs = {"image": "fedpipe:0.1.0"} | kwargs
    with pytest.raises(error) as info:
        deploy.render(**kwargs)
    assert culprit in str(info.value) and "\n" not in str(info.value)


def test_image_with_digest_is_pinned():
    digest = "registry.example.com:5000/fedpipe@sha256:" + "a" * 64
    assert deploy.check_image(digest) == digest
    assert deploy.check_image("registry.example.com:5000/fedpipe:1.2") == (
        "registry.example.com:5000/fedpipe:1.2")
    with pytest.raises(ConfigError):
        deploy.check_image("registry.example.com:5000/fedpipe")


# --- committed files and the CLI --------------------------------------------------------------


@pytest.mark.parametrize("base,extra", [("base", []), ("base-tls", ["--tls-secret", "fedpipe-tls"])])
def test_committed_manifests_equal_a_fresh_render(tmp_path, base, extra):
    out = tmp_path / base
    assert main(["deploy", "render", "--clients", "0,1,2", "--out", str(out), "-q", *extra]) == 0
    for name in ("cluster.yaml", "kustomization.yaml"):
        assert (DEPLOY / base / name).read_text() == (out / name).read_text(), (
            f"deploy/{base}/{name} drifted: regenerate with "
            f"`fedpipe deploy render --clients 0,1,2 --out deploy/{base} {' '.join(extra)}`"
        )


def _cert(pem_b64: str):
    import base64

    from cryptography import x509

    return x509.load_pem_x509_certificate(base64.b64decode(pem_b64))


def _mounted_secret(resource: dict[str, Any], part: str) -> str:
    volumes = resource["spec"][part]["spec"]["volumes"]
    return next(v["secret"]["secretName"] for v in volumes if v["name"] == "tls")


def test_render_tls_gives_every_member_its_own_secret_and_never_a_ca_or_driver_key(
        tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["deploy", "render", "--clients", "0,1", "--out", str(out), "--tls",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    secrets = {d["metadata"]["name"]: d["data"]
               for d in yaml.safe_load_all((out / deploy.SECRET_MANIFEST).read_text())}
    assert sorted(secrets) == ["fedpipe-tls-client-0", "fedpipe-tls-client-1",
                               "fedpipe-tls-scheduler", "fedpipe-tls-server"]
    assert all(set(data) == {"ca.crt", "tls.crt", "tls.key"} for data in secrets.values())
    assert len({data["ca.crt"] for data in secrets.values()}) == 1
    assert len({data["tls.key"] for data in secrets.values()}) == 4  # no key shared
    ca = _cert(next(iter(secrets.values()))["ca.crt"])
    for name, data in secrets.items():
        cert = _cert(data["tls.crt"])
        cert.verify_directly_issued_by(ca)
        assert cert.subject.rfc4514_string() == f"CN=fedpipe-{name.removeprefix('fedpipe-tls-')}"
    # The CA key and the driver's key stay in --tls-dir, out of every Secret.
    kept = [(out / "tls" / "ca.key").read_bytes(), Path(summary["driver_tls"]["key"]).read_bytes()]
    text = (out / deploy.SECRET_MANIFEST).read_text()
    assert not any(base64.b64encode(k).decode() in text for k in kept)
    assert (out / deploy.SECRET_MANIFEST).stat().st_mode & 0o077 == 0
    assert (out / "tls" / "ca.key").stat().st_mode & 0o077 == 0
    # Each pod mounts its own member's Secret.
    cluster = list(yaml.safe_load_all((out / "cluster.yaml").read_text()))
    assert all(r["kind"] != "Secret" for r in cluster)
    assert _mounted_secret(cluster[0], "scheduler") == "fedpipe-tls-scheduler"
    assert _mounted_secret(cluster[0], "worker") == "fedpipe-tls-server"
    assert [_mounted_secret(r, "worker") for r in cluster[1:]] == ["fedpipe-tls-client-0",
                                                                   "fedpipe-tls-client-1"]
    for container in (c for r in cluster for c in _containers(r)):
        assert container["args"][container["args"].index("--protocol") + 1] == "tls"
        # Only the driver's certificate may run code (fedpipe.deploy.guard, on every member).
        assert container["args"][container["args"].index("--preload") + 1] == deploy.GUARD
    workers = [c for r in cluster for c in _containers(r) if c["args"][1] == "worker"]
    assert workers and all("--preload-nanny" in c["args"] for c in workers)
    # Rendering again with one more client keeps the CA and every earlier member's key.
    assert main(["deploy", "render", "--clients", "0,1,2", "--out", str(out), "--tls", "-q"]) == 0
    again = {d["metadata"]["name"]: d["data"]
             for d in yaml.safe_load_all((out / deploy.SECRET_MANIFEST).read_text())}
    assert all(again[name] == data for name, data in secrets.items())
    _cert(again["fedpipe-tls-client-2"]["tls.crt"]).verify_directly_issued_by(ca)


def test_rendered_member_certificates_form_a_working_tls_cluster(tmp_path):
    """Scheduler, a client's worker and the driver each present their own rendered files."""
    from distributed import Client, LocalCluster
    from distributed.security import Security
    from fedpipe.deploy import tls

    files = tls.ensure_roles(tmp_path / "tls", ["scheduler", "client-0", "driver"])
    security = Security(
        tls_ca_file=str(files["driver"].ca), require_encryption=True,
        tls_scheduler_cert=str(files["scheduler"].cert),
        tls_scheduler_key=str(files["scheduler"].key),
        tls_worker_cert=str(files["client-0"].cert), tls_worker_key=str(files["client-0"].key),
        tls_client_cert=str(files["driver"].cert), tls_client_key=str(files["driver"].key))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls",
                      security=security, dashboard_address="127.0.0.1:0", host="127.0.0.1") as running, \
            Client(running, security=security) as dask_client:
        assert dask_client.submit(sum, [1, 2]).result(timeout=30) == 3
    with pytest.raises(ConfigError, match="ca.key"):  # a CA without its key cannot sign more
        (tmp_path / "tls" / "ca.key").unlink()
        tls.ensure_roles(tmp_path / "tls", ["client-1"])


def test_render_to_stdout_and_errors_exit_2(capsys):
    assert main(["deploy", "render", "--clients", "0,1"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["DaskCluster", "DaskWorkerGroup", "DaskWorkerGroup"]
    assert main(["deploy", "render", "--clients", "x_y"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'x_y'" in err


# --- kustomize overlays -----------------------------------------------------------------------


def _kustomize(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays cannot be rendered offline here")
    result = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_renders_a_consistent_cluster(overlay):
    namespace, image, tls = OVERLAYS[overlay]
    docs = _kustomize(overlay)
    assert {d["metadata"]["namespace"] for d in docs} == {namespace}
    resources = _dask_resources(docs)
    for resource in resources:
        validate(resource)
        assert resource["metadata"]["labels"]["app.kubernetes.io/environment"] == overlay
    (cluster,) = [r for r in resources if r["kind"] == "DaskCluster"]
    name = cluster["metadata"]["name"]
    groups = [r for r in resources if r["kind"] == "DaskWorkerGroup"]
    # Cluster references survive (no namePrefix), and exactly one group per client.
    assert {g["spec"]["cluster"] for g in groups} == {name}
    clients = [g["spec"]["worker"]["metadata"]["labels"][deploy.CLIENT_LABEL] for g in groups]
    assert sorted(clients) == ["0", "1", "2"]
    for group, client_id in zip(groups, clients, strict=True):
        args = group["spec"]["worker"]["spec"]["containers"][0]["args"]
        assert args[args.index("--resources") + 1] == f"client-{client_id}=1"
    # The scheduler Service selects exactly the labels the operator gives the scheduler pod.
    assert cluster["spec"]["scheduler"]["service"]["selector"] == {
        "dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    containers = [c for r in resources for c in _containers(r)]
    assert {c["image"] for c in containers} == {image}
    scheme = "tls" if tls else "tcp"
    for container in containers:
        assert ("--protocol" in container["args"]) == tls
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        if container["name"] == "worker":
            assert env["DASK_SCHEDULER_ADDRESS"] == f"{scheme}://{name}-scheduler:8786"
        assert env.get("DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION") == ("True" if tls else None)


def test_prod_network_policy_selects_the_scheduler_pod():
    docs = _kustomize("prod")
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    (cluster,) = [d for d in docs if d["kind"] == "DaskCluster"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector == cluster["spec"]["scheduler"]["service"]["selector"]
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {deploy.SCHEDULER_PORT, deploy.DASHBOARD_PORT}


# Imported only inside the functions that talk to a cluster or make certificates.
HEAVY = ("dask_kubernetes", "kr8s", "cryptography")
_IMPORT_PROBE = """
import sys
import fedpipe.cli.deploy, fedpipe.cli.federate, fedpipe.cli.train
from fedpipe.cli.main import main
try:
    main(["--help"])
except SystemExit:
    pass
print("heavy:", sorted(m for m in sys.modules if m.split(".")[0] in HEAVY))
"""


def test_cli_imports_no_kubernetes_client_or_cryptography():
    # A fresh interpreter: this test process has imported them already (CRDs, TLS fixtures).
    probe = f"HEAVY = {HEAVY!r}\n{_IMPORT_PROBE}"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True)
    assert "usage: fedpipe" in result.stdout  # --help really built every subcommand
    assert result.stdout.splitlines()[-1] == "heavy: []"
