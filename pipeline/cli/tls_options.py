"""``--tls-ca-file --tls-cert --tls-key``: the driver as a TLS client of a ``tls://`` scheduler.

Shared by ``train`` and ``federate``. The files are the driver's own (``client.crt``/``.key``
of :func:`fedpipe.deploy.tls.generate_roles`), not the scheduler's or a worker's.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from fedpipe.errors import ValidationError

FLAGS = ("tls_ca_file", "tls_cert", "tls_key")


def add_tls_options(group: argparse._ArgumentGroup) -> None:
    """Add the three flags to ``group`` (the cluster options of a command)."""
    group.add_argument("--tls-ca-file", help="CA certificate of a tls:// scheduler (with "
                                             "--tls-cert and --tls-key: the driver's own)")
    group.add_argument("--tls-cert", help="the driver's TLS certificate")
    group.add_argument("--tls-key", help="the driver's TLS private key")


@contextlib.contextmanager
def client_tls(args: argparse.Namespace) -> Iterator[None]:
    """Dask's TLS client settings from the flags for the block; nothing when none is given."""
    given = {name: getattr(args, name, None) for name in FLAGS}
    if not any(given.values()):
        yield
        return
    missing = [f"--{n.replace('_', '-')}" for n, v in given.items() if not v]
    if missing:
        raise ValidationError(f"TLS needs --tls-ca-file, --tls-cert and --tls-key; missing "
                              f"{', '.join(missing)}")
    if not (getattr(args, "scheduler", None) or getattr(args, "kubernetes", None)):
        raise ValidationError("--tls-ca-file/--tls-cert/--tls-key need --scheduler tls://HOST:PORT "
                              "or --kubernetes (the cluster fedpipe starts itself listens on "
                              "loopback only)")
    import dask
    from fedpipe.deploy import tls

    with dask.config.set(tls.client_config(*given.values())):
        yield
