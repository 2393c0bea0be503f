"""A live fedpipe cluster on Kubernetes: launch it, find its scheduler, connect to it.

The manifests themselves come from :mod:`fedpipe.deploy.render`; this module is the part that talks to
an API server, through dask-kubernetes (``KubeCluster``, and its Service lookup, which uses kr8s
and, outside the cluster, a ``kubectl port-forward``). Those packages are imported inside the
functions that need them, so that ``fedpipe --help`` and commands that never touch Kubernetes do
not pay for (or need) them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fedpipe.deploy import render as deploy
from fedpipe.errors import ConfigError

if TYPE_CHECKING:
    from distributed import Client, Security


def up(
    clients: str | Sequence[str],
    image: str | None = None,
    namespace: str | None = None,
    *,
    adapt: tuple[int, int] | None = None,
    cluster_class: Callable[..., Any] | None = None,
    **options: Any,
) -> Any:
    """Create the cluster through ``dask_kubernetes.operator.KubeCluster`` with fedpipe's specs.

    The ``DaskCluster`` is passed as ``custom_cluster_spec``; each client group is added with
    ``add_worker_group(custom_spec=...)``. The cluster outlives this process
    (``shutdown_on_close=False``): delete it with ``kubectl delete daskcluster <name>``.

    Parameters
    ----------
    clients, image, namespace, **options
        As for :func:`fedpipe.deploy.render.render`.
    adapt : (int, int), optional
        Autoscale the server group between these bounds. Refused when there are client groups:
        retiring a worker copies its in-memory results to another worker, and a client's
        results must not leave its own nodes.
    cluster_class : callable, optional
        Stand-in for ``KubeCluster`` (tests record the specs it receives).

    Returns
    -------
    KubeCluster
        Connected to the new cluster (``.scheduler_address``).
    """
    if options.get("tls_secret"):
        raise ConfigError(
            "--tls with `deploy up`: KubeCluster waits for the scheduler over plain tcp; "
            "apply `fedpipe deploy render --tls` output with kubectl instead"
        )
    resources = deploy.render(clients, image, namespace, **options)
    if adapt is not None and len(resources) > 1:
        raise ConfigError("adapt: client worker groups are never autoscaled (it would move data)")
    if cluster_class is None:
        from dask_kubernetes.operator import KubeCluster as cluster_class
    cluster_spec, groups = resources[0], resources[1:]
    cluster = cluster_class(
        custom_cluster_spec=cluster_spec,
        namespace=namespace,
        shutdown_on_close=False,
        quiet=True,
    )
    prefix = f"{cluster_spec['metadata']['name']}-"
    for group in groups:
        # KubeCluster names the group "<cluster>-<name>": pass the suffix to get ours back.
        cluster.add_worker_group(
            name=group["metadata"]["name"].removeprefix(prefix),
            n_workers=group["spec"]["worker"]["replicas"],
            custom_spec=group["spec"]["worker"],
        )
    if adapt is not None:
        cluster.adapt(minimum=adapt[0], maximum=adapt[1])
    return cluster


def scheduler_address(
    name: str,
    namespace: str | None = None,
    *,
    tls: bool | None = None,
    lookup: Callable[[str, str | None], str] | None = None,
) -> str:
    """The address a driver uses for cluster ``name``, looked up from its scheduler Service.

    Inside Kubernetes this is the Service's DNS name; outside, dask-kubernetes starts a
    ``kubectl port-forward`` and returns ``localhost:<port>``. ``tls=None`` picks ``tls://``
    when the local Dask config carries a TLS CA file (``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``).
    """
    # Looked up at call time (not bound as a default) so tests can stub the module attribute.
    lookup = lookup or _service_address
    address = lookup(f"{name}-scheduler", namespace)
    if tls is None:
        import dask

        tls = bool(dask.config.get("distributed.comm.tls.ca-file", None))
    return f"tls://{address.split('://', 1)[-1]}" if tls else address


def resolve_kubernetes(spec: str, lookup: Callable[[str, str | None], str] | None = None) -> str:
    """Scheduler address for ``--kubernetes NAME`` or ``--kubernetes NAMESPACE/NAME``."""
    namespace, _, name = spec.rpartition("/")
    if not deploy.is_dns_label(name) or (namespace and not deploy.is_dns_label(namespace)):
        raise ConfigError(f"--kubernetes {spec!r}: expected NAME or NAMESPACE/NAME")
    return scheduler_address(name, namespace or None, lookup=lookup)


def cluster_address(scheduler: str | None, kubernetes: str | None) -> str | None:
    """What ``--scheduler ADDRESS`` / ``--kubernetes [NAMESPACE/]NAME`` of train/federate mean.

    ``None`` when neither is given (the command starts a local cluster).
    """
    if scheduler and kubernetes:
        raise ConfigError(f"--scheduler {scheduler} and --kubernetes {kubernetes}: give one")
    if scheduler:
        check_scheduler_address(scheduler)
    return resolve_kubernetes(kubernetes) if kubernetes else scheduler


def check_scheduler_address(address: str) -> str:
    """Refuse an address no Dask comm can dial (an unknown scheme) in one line."""
    from distributed.comm import parse_address
    from distributed.comm.registry import get_backend

    try:
        get_backend(parse_address(address)[0])
    except ValueError as exc:
        raise ConfigError(f"--scheduler {address!r} is not a scheduler address such as "
                          f"tcp://HOST:8786 ({exc})") from None
    return address


def connect_kubernetes(
    name: str,
    namespace: str | None = None,
    *,
    security: Security | None = None,
    lookup: Callable[[str, str | None], str] | None = None,
) -> Client:
    """A ``distributed.Client`` (call it ``dask_client``) connected to cluster ``name``.

    ``security`` (a :class:`distributed.Security`, e.g. ``fedpipe.deploy.tls.load(dir).security()``)
    switches the address to ``tls://``.
    """
    from distributed import Client

    tls = True if security is not None else None
    address = scheduler_address(name, namespace, tls=tls, lookup=lookup)
    return Client(address, security=security)


def _service_address(service: str, namespace: str | None) -> str:
    try:
        from dask_kubernetes.operator.networking import get_scheduler_address
    except ImportError as exc:
        raise ConfigError("--kubernetes needs dask-kubernetes: pip install 'fedpipe[kubernetes]'") from exc
    try:
        return asyncio.run(get_scheduler_address(service, namespace))
    except Exception as exc:  # kr8s raises many types: no kubeconfig, not found, forbidden
        where = f"namespace {namespace!r}" if namespace else "the current namespace"
        raise ConfigError(f"scheduler Service {service!r} in {where}: {exc}") from exc
