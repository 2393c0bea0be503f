"""``fedpipe deploy render|up``: Kubernetes manifests and the launcher (see docs/kubernetes.md)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from fedpipe.cli.argtypes import nonneg_int, positive_int
from fedpipe.deploy import kube, tls
from fedpipe.deploy import render as deploy
from fedpipe.errors import ConfigError


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``deploy`` with its two actions to the ``fedpipe`` parser."""
    parser = subparsers.add_parser(
        "deploy", help="Kubernetes manifests (render) or a live cluster (up) via dask-kubernetes"
    )
    actions = parser.add_subparsers(dest="deploy_action", required=True,
                                    parser_class=type(parser))
    render = actions.add_parser("render", parents=[*parents, _cluster_options()],
                                help="write DaskCluster + one DaskWorkerGroup per client as YAML")
    render.add_argument("--out", type=Path, help="directory for cluster.yaml (default: stdout)")
    render.add_argument("--tls", action="store_true",
                        help="tls:// + require-encryption with one certificate per member "
                             "(scheduler, server, each client, the driver) from --tls-dir")
    render.add_argument("--tls-dir", type=Path,
                        help="the CA and per-member certificates, kept if present and signed "
                             "there if absent (default OUT/tls)")
    render.add_argument("--tls-secret", metavar="NAME",
                        help="like --tls, but mount an existing Secret NAME (created out of band "
                             "with ca.crt, tls.crt, tls.key) and write no key material")
    render.set_defaults(func=run_render)
    up = actions.add_parser("up", parents=[*parents, _cluster_options()],
                            help="create the cluster with dask_kubernetes.operator.KubeCluster")
    up.add_argument("--adapt", metavar="MIN,MAX",
                    help="autoscale the server group (refused with client groups)")
    up.set_defaults(func=run_up)


def _cluster_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--clients", default="",
                         help="client ids, comma separated (e.g. 0,1,2); empty: no client groups")
    options.add_argument("--image", default=None,
                         help=f"image with a tag or digest (default {deploy.default_image()})")
    options.add_argument("--namespace", default=None, help="Kubernetes namespace")
    options.add_argument("--name", default="fedpipe", help="DaskCluster name (default fedpipe)")
    options.add_argument("--server-workers", type=nonneg_int, default=1,
                         help="replicas of the server worker group (default 1)")
    options.add_argument("--threads", type=positive_int, default=2, help="threads per worker (default 2)")
    options.add_argument("--memory", default="4Gi", help="memory per worker (default 4Gi)")
    options.add_argument("--data-path", default="/data",
                         help="mount path of each client's data volume (default /data)")
    options.add_argument("--node-label", metavar="KEY",
                         help="client groups get nodeSelector KEY=<client id>")
    options.add_argument("--site-store", metavar="PATH",
                         help="site-local stores (federate --sites): each client worker reads "
                              "PATH inside its own volume (FEDPIPE_SITE_STORE)")
    options.add_argument("--taint", metavar="KEY",
                         help="client groups tolerate the taint KEY=<client id>:NoSchedule")
    return options


# Kubernetes' own grammars: a memory quantity, a label key ([DNS-subdomain/]name), an object name.
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL_KEY = re.compile(rf"^({_SUBDOMAIN}/)?{_LABEL_NAME}$")
_OBJECT_NAME = re.compile(rf"^{_SUBDOMAIN}$")


def _check_options(args: argparse.Namespace) -> None:
    """What Kubernetes would refuse at apply time, refused here naming the flag."""
    if not _QUANTITY.match(args.memory):
        raise ConfigError(f"--memory {args.memory!r} is not a Kubernetes quantity (e.g. 4Gi, 512Mi)")
    if not args.data_path.startswith("/"):
        raise ConfigError(f"--data-path {args.data_path!r} must be an absolute path in the pod")
    for flag, key in (("--node-label", args.node_label), ("--taint", args.taint)):
        if key is not None and not _LABEL_KEY.match(key):
            raise ConfigError(f"{flag} {key!r} is not a Kubernetes label key ([prefix/]name)")
    secret = getattr(args, "tls_secret", None)
    if secret is not None and (len(secret) > 253 or not _OBJECT_NAME.match(secret)):
        raise ConfigError(f"--tls-secret {secret!r} is not a Kubernetes object name")


def _render_options(args: argparse.Namespace) -> dict[str, Any]:
    _check_options(args)
    return {
        "name": args.name,
        "server_workers": args.server_workers,
        "threads": args.threads,
        "memory": args.memory,
        "data_path": args.data_path,
        "node_label": args.node_label,
        "taint_key": args.taint,
        "site_store": args.site_store,
    }


def run_render(args: argparse.Namespace) -> dict[str, Any]:
    """Render the manifests; with ``--tls`` also one Secret per member (own file, mode 0600)."""
    options = _render_options(args)
    secrets, tls_dir, driver = [], None, None
    if args.tls and args.tls_secret:
        raise ConfigError("--tls and --tls-secret: give one (generate material, or reference it)")
    if args.tls_secret:
        options["tls_secret"] = args.tls_secret
    if args.tls:
        tls_dir = args.tls_dir or (args.out / "tls" if args.out else None)
        if tls_dir is None:
            raise ConfigError("--tls needs --out or --tls-dir (where the certificates go)")
        secrets, driver = _role_secrets(tls_dir, args)
        options.update(tls_secret=f"{args.name}-tls", tls_per_role=True)
    resources = deploy.render(args.clients, args.image, args.namespace, **options)
    summary: dict[str, Any] = {
        "resources": [f"{r['kind']}/{r['metadata']['name']}" for r in resources],
        "clients": deploy.parse_clients(args.clients),
        "tls_dir": str(tls_dir) if tls_dir else None,
    }
    if driver is not None:
        summary["driver_tls"] = driver
    if args.out is None:
        sys.stdout.write(deploy.dump(resources + secrets))
        return summary
    summary["files"] = [str(p) for p in deploy.write_manifests(resources, args.out, secrets)]
    if not args.json and not args.quiet:
        print(f"wrote {', '.join(summary['files'])}", file=sys.stderr)
        if driver is not None:
            print("the driver's own certificate stays here: fedpipe train/federate ... "
                  + " ".join(f"--tls-{k} {v}" for k, v in driver.items()), file=sys.stderr)
    return summary


def _role_secrets(tls_dir: Path, args: argparse.Namespace) -> tuple[list[dict], dict[str, str]]:
    """One Secret per member of the cluster; the driver's key is never put into one."""
    hosts = [f"{args.name}-scheduler", "localhost", "127.0.0.1"]
    if args.namespace:
        hosts += [f"{args.name}-scheduler.{args.namespace}",
                  f"{args.name}-scheduler.{args.namespace}.svc"]
    roles = deploy.tls_roles(args.clients)
    files = tls.ensure_roles(tls_dir, [*roles, "driver"], hosts=hosts)
    names = deploy.tls_secret_names(f"{args.name}-tls", args.clients)
    secrets = [deploy.tls_secret(files[role], names[role], args.namespace) for role in roles]
    mine = files["driver"]
    return secrets, {"ca-file": str(mine.ca), "cert": str(mine.cert), "key": str(mine.key)}


def run_up(args: argparse.Namespace) -> dict[str, Any]:
    """Create the cluster; it keeps running after this command exits."""
    adapt = None
    if args.adapt:
        try:
            low, high = (int(v) for v in args.adapt.split(","))
        except ValueError:
            raise ConfigError(f"--adapt {args.adapt!r}: expected MIN,MAX (two integers)") from None
        adapt = (low, high)
    cluster = kube.up(args.clients, args.image, args.namespace, adapt=adapt,
                      **_render_options(args))
    summary = {
        "name": args.name,
        "namespace": args.namespace,
        "scheduler_address": cluster.scheduler_address,
        "groups": [f"{args.name}-client-{c}" for c in deploy.parse_clients(args.clients)],
    }
    if not args.json and not args.quiet:
        print(f"cluster {args.name} is up at {cluster.scheduler_address}; "
              f"connect with --kubernetes {args.namespace + '/' if args.namespace else ''}"
              f"{args.name}; delete with kubectl delete daskcluster {args.name}", file=sys.stderr)
    return summary
